"""Screening: which segments does the model itself judge to be noise? (paper eq. 10-11)

For an image v and its text t of segments p_1..p_n, t^(-j) is t without p_j and

    dITC_j = L_ITC(v, t^(-j)) - L_ITC(v, t)        dITM_j = s(v, t^(-j)) - s(v, t)

p_j is a candidate when dITC_j < -itc_margin and noise when also dITM_j > itm_margin (the
paper's rule, arm ``paper``). Two more arms, sarkit's: ``itc`` (dITC_j < -itc_alone by
itself) and ``segment``, the default: aITC_j = L_ITC(v, p_j), the segment by itself against
the image, is noise when it lies more than ``segment_z`` median absolute deviations above
its field's median over the screened records (a margin in the data's own units, so it needs
no retuning when the judge or the data changes scale; it assumes under half of a field is
wrong). Removing one segment of eight moves the text embedding little, so dITC separates
corrupted from clean segments with AUC 0.73 on MSTAR where aITC does with 0.95
(docs/results.md, SCIO).
L_ITC of one pair is its symmetric InfoNCE against a fixed negative bank, the momentum queue
the training stage left (entries of the pair's own group kept out: its own queued features
and texts that describe the same thing), so a value does not depend on what else is in the
batch and compares across images, ranks and resumed runs. Batched: an image is encoded once
and its 2n + 1 text variants (full, each segment dropped, each segment alone) run through
the text tower in two batches (the long rows, then the short ones, so these are not padded
to full length), and only the long ones through the ITM cross-attention (aITC needs none).
Truncation is decided on the full text (TextCodec), so a dropped segment never lets the
others grow back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sarkit import log


@dataclass
class Bank:
    """Fixed negatives: normalised image and text features and the group of each entry."""

    img: torch.Tensor
    txt: torch.Tensor
    groups: torch.Tensor


def queue_bank(momentum: Any) -> Bank | None:
    """The momentum queue as a bank, or None when it holds fewer than two entries."""
    img, txt, groups = momentum.queued()
    if img.shape[0] < 2:
        return None
    return Bank(img.float(), txt.float(), groups)


@torch.no_grad()
def records_bank(model: Any, momentum: Any, codec: Any, images, texts, groups) -> Bank:
    """A bank from the records themselves (momentum towers), when no queue was kept."""
    feats_i, feats_t = [], []
    for s in range(0, len(texts), 64):
        enc = codec.encode(texts[s : s + 64])
        i, t = momentum.features(images[s : s + 64], enc.input_ids, enc.attention_mask)
        feats_i.append(i)
        feats_t.append(t)
    return Bank(torch.cat(feats_i), torch.cat(feats_t), torch.as_tensor(groups))


class Scorer:
    """Per-pair L_ITC (against the bank) and ITM match probability, many texts per image."""

    def __init__(self, model: Any, codec: Any, bank: Bank, device: torch.device):
        self.model, self.codec, self.device = model, codec, device
        self.bank = Bank(bank.img.to(device), bank.txt.to(device), bank.groups.to(device))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_images(images.to(self.device))

    @torch.no_grad()
    def score(
        self,
        tokens: torch.Tensor,
        img_feat: torch.Tensor,
        groups: torch.Tensor,
        owner: Sequence[int],
        texts: Sequence[Any],
        drop: Sequence[Sequence[int]] | None = None,
        itm: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(L_ITC, ITM probability or None without `itm`) of each text row against the
        image `owner[row]`."""
        enc = self.codec.encode(texts, drop=drop).to(self.device)
        own = torch.as_tensor(list(owner), device=self.device)
        txt = self.model.encode_texts(enc)
        exclude = self.bank.groups[None, :] == groups.to(self.device)[own][:, None]
        loss = self.model.itc_pair_loss(img_feat[own], txt, self.bank.img, self.bank.txt, exclude)
        if not itm:
            return loss.float().cpu(), None
        return loss.float().cpu(), self.model.itm_scores(tokens[own], enc).float().cpu()


def nonempty(segments: Sequence[str]) -> list[int]:
    return [j for j, s in enumerate(segments) if s.strip()]


Scores = tuple[float, float, float]  # (dITC, dITM, aITC) of one segment


def screen_images(
    scorer: Scorer, images: torch.Tensor, segments: list[list[str]], groups: torch.Tensor
) -> list[dict[int, Scores]]:
    """{segment index: (dITC, dITM, aITC)} for each image: one image encoding for all."""
    tokens, img_feat = scorer.encode_images(images)
    # Two text batches, each padded to its own longest row: the full texts and those
    # without one segment (long), then each segment alone (short). One batch of all 2n + 1
    # would pad the n short rows to full length: twice the text tower's work.
    long_owner, long_drop, alone_owner, alone_drop = [], [], [], []
    where = []  # (image, segment, full row, row without the segment, row of it alone)
    for i, segs in enumerate(segments):
        full = len(long_owner)
        long_owner.append(i)
        long_drop.append([])
        present = nonempty(segs)
        for j in present:
            where.append((i, j, full, len(long_owner), len(alone_owner)))
            long_owner.append(i)
            long_drop.append([j])
            alone_owner.append(i)
            alone_drop.append([k for k in present if k != j])
    texts = [segments[i] for i in long_owner]
    loss, itm = scorer.score(tokens, img_feat, groups, long_owner, texts, long_drop)
    alone = torch.zeros(0)
    if alone_owner:
        texts = [segments[i] for i in alone_owner]
        alone, _ = scorer.score(tokens, img_feat, groups, alone_owner, texts, alone_drop, False)
    out: list[dict[int, Scores]] = [{} for _ in segments]
    for i, j, base, row, solo in where:
        out[i][j] = (float(loss[row] - loss[base]), float(itm[row] - itm[base]),
                     float(alone[solo]))  # fmt: skip
    return out


def screen_naive(
    scorer: Scorer, images: torch.Tensor, segments: list[list[str]], groups: torch.Tensor
) -> list[dict[int, Scores]]:
    """The same numbers one text variant per forward pass, the image re-encoded each time
    (the baseline of bench/scio.py; like the batched path it skips ITM for the segments
    alone, so the benchmark's ratio is the batching's)."""
    out: list[dict[int, Scores]] = []
    for i, segs in enumerate(segments):

        def one(drop: list[int], itm: bool = True, i=i, segs=segs) -> tuple[float, float]:
            tokens, img_feat = scorer.encode_images(images[i : i + 1])
            loss, s = scorer.score(tokens, img_feat, groups[i : i + 1], [0], [segs], [drop], itm)
            return float(loss[0]), float(s[0]) if s is not None else math.nan

        base = one([])
        scores = {}
        present = nonempty(segs)
        for j in present:
            lj, sj = one([j])
            alone, _ = one([k for k in present if k != j], itm=False)
            scores[j] = (lj - base[0], sj - base[1], alone)
        out.append(scores)
    return out


# ---------------------------------------------------------------- the stage, resumable


JOURNAL_VERSION = 2  # 2: each segment's scores are [dITC, dITM, aITC]


class Journal:
    """Finished screening batches, one JSON line each, flushed as they finish.

    Batches have a fixed composition (batch k = screened records k*B .. k*B+B-1), so a rerun
    after a kill skips what is done and scores the rest exactly as an uninterrupted run. A
    torn last line (killed mid-write) is ignored; a batch whose records differ (other input
    or batch size) is not reused. Under torchrun each rank appends to a file of its own
    (:func:`journal_path`) and reads the others' too (``others``, never written or cut:
    their ranks may be appending), so a rerun with another number of ranks reuses them all.
    """

    def __init__(self, path: Path, others: Sequence[Path] = ()):
        self.path = path
        self.done: dict[int, dict] = {}
        for other in others:
            if other != path and other.exists():
                data = other.read_bytes()
                self._read(data[: data.rfind(b"\n") + 1])
        if path.exists():
            data = path.read_bytes()
            whole = data[: data.rfind(b"\n") + 1]
            if len(whole) != len(data):  # a torn last line: cut it, appends start clean
                with open(path, "r+b") as fh:
                    fh.truncate(len(whole))
            self._read(whole)
        self._fh = None

    def _read(self, whole: bytes) -> None:
        for line in whole.decode("utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                self.done[int(entry["batch"])] = entry
            except (ValueError, KeyError, TypeError):
                continue

    def get(self, k: int, ids: list[str]) -> dict | None:
        entry = self.done.get(k)
        if entry is None or entry.get("ids") != ids or entry.get("v") != JOURNAL_VERSION:
            return None  # another batch, or one screened before aITC existed
        return entry

    def add(self, entry: dict) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._fh.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._fh.flush()
        self.done[int(entry["batch"])] = entry

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def journal_path(folder: Path, rank: int) -> Path:
    """Rank 0 keeps journal.jsonl (the one-process name), rank r journal-rankR.jsonl."""
    return folder / ("journal.jsonl" if rank == 0 else f"journal-rank{rank}.jsonl")


def journal_files(folder: Path) -> list[Path]:
    """Every rank's journal in a screening folder (whatever world size wrote them)."""
    return [folder / "journal.jsonl", *sorted(folder.glob("journal-rank*.jsonl"))]


def batch_ids(pool: list[dict], batch: int, k: int) -> list[str]:
    return [str(pool[i].get("id")) for i in range(k * batch, min(len(pool), (k + 1) * batch))]


def screen_share(
    scorer: Scorer,
    load_image: Any,
    pool: list[dict],
    groups: list[int],
    codec: Any,
    batch: int,
    journal: Path,
    rank: int = 0,
    world: int = 1,
    others: Sequence[Path] = (),
) -> dict[int, dict]:
    """Screen this rank's batches (k % world == rank); {batch: journal entry}.

    The batches are those of a one-process run (batch k = pool records k*B .. k*B+B-1) and
    a record's numbers depend only on its own batch, so sharding changes no value. Batches
    found in ``journal`` or ``others`` (a killed run's) are reused, not screened again.
    `load_image(index)` returns the model's input tensor or raises SarkitError (unreadable
    tile: that record is reported and passed through, the batch goes on).
    """
    from sarkit.errors import SarkitError

    book = Journal(journal, others)
    mine = list(range(rank, math.ceil(len(pool) / batch), world))
    out: dict[int, dict] = {}
    reused = 0
    group_t = torch.as_tensor(groups)
    try:
        with log.progress("scio screen", total=len(mine)) as advance:
            for k in mine:
                idx = list(range(k * batch, min(len(pool), (k + 1) * batch)))
                ids = batch_ids(pool, batch, k)
                entry = book.get(k, ids)
                if entry is None:
                    entry = {"batch": k, "v": JOURNAL_VERSION, "ids": ids, "scores": {},
                             "bad": {}}  # fmt: skip
                    good, tensors = [], []
                    for i in idx:
                        try:
                            tensors.append(load_image(i))
                            good.append(i)
                        except SarkitError as exc:
                            entry["bad"][str(i)] = str(exc)
                    if good:
                        segs = [codec.segments(pool[i]["texts"]) for i in good]
                        result = screen_images(scorer, torch.stack(tensors), segs, group_t[good])
                        for i, per in zip(good, result, strict=True):
                            entry["scores"][str(i)] = {
                                codec.fields[j]: [round(x, 7) for x in three]
                                for j, three in per.items()
                            }
                    book.add(entry)
                else:
                    reused += 1
                out[k] = entry
                advance(1)
    finally:
        book.close()
    if reused:
        log.info(f"scio screen: {reused} of {len(mine)} batches were done before; not redone")
    return out


def merge_shares(
    shares: Sequence[dict[int, dict]], pool: list[dict], batch: int, where: str
) -> tuple[dict[int, dict[str, list[float]]], dict[int, str]]:
    """Every rank's entries in batch order: ({pool index: {field: [dITC, dITM, aITC]}},
    {index: why bad}). A batch missing, or screened for other records, is an error naming
    `where` (the stage folder): it would silently drop records from the noise pool."""
    from sarkit.errors import SarkitError

    entries: dict[int, dict] = {}
    for share in shares:
        entries.update({int(k): v for k, v in share.items()})
    scores: dict[int, dict[str, list[float]]] = {}
    bad: dict[int, str] = {}
    for k in range(math.ceil(len(pool) / batch)):
        entry = entries.get(k)
        if entry is None or entry.get("ids") != batch_ids(pool, batch, k):
            raise SarkitError(f"{where}: screening batch {k} is missing from every rank's share")
        for i, per in entry["scores"].items():
            scores[int(i)] = per
        for i, why in entry["bad"].items():
            bad[int(i)] = why
    return scores, bad


def run_screening(
    scorer: Scorer,
    load_image: Any,
    pool: list[dict],
    groups: list[int],
    codec: Any,
    batch: int,
    journal_path: Path,
) -> tuple[dict[int, dict[str, list[float]]], dict[int, str]]:
    """Screen every record of `pool` in one process; ({pool index: {field: [dITC, dITM, aITC]}},
    {index: why bad}). See :func:`screen_share` and :func:`merge_shares`."""
    share = screen_share(scorer, load_image, pool, groups, codec, batch, journal_path)
    return merge_shares([share], pool, batch, str(journal_path.parent))


RULES = ("paper", "itc", "segment")
MIN_FIELD = 8  # segments of a field below which its median and MAD are not trusted


def segment_z(scores: dict[int, dict[str, list[float]]]) -> dict[tuple[int, str], float]:
    """{(pool index, field): (aITC - the field's median aITC) / the field's MAD}; fields with
    fewer than MIN_FIELD screened segments get none (too few to know what is usual)."""
    import numpy as np

    by_field: dict[str, list[tuple[int, float]]] = {}
    for i, per in scores.items():
        for name, three in per.items():
            by_field.setdefault(name, []).append((i, three[2]))
    out: dict[tuple[int, str], float] = {}
    for name, items in by_field.items():
        if len(items) < MIN_FIELD:
            continue
        x = np.array([v for _, v in items], float)
        med = float(np.median(x))
        mad = max(float(np.median(np.abs(x - med))), 1e-6)
        for i, v in items:
            out[(i, name)] = (v - med) / mad
    return out


def decide(
    scores: dict[int, dict[str, list[float]]],
    rules: Sequence[str] = ("segment",),
    itc_margin: float = 0.0,
    itm_margin: float = 0.01,
    field_cap: float = 0.3,
    itc_alone: float = 0.1,
    z_margin: float = 3.0,
    z: dict[tuple[int, str], float] | None = None,
) -> dict[int, set[str]]:
    """The noise pool: {pool index: flagged fields}. A segment is noise when any arm of
    `rules` says so: ``paper`` dITC < -itc_margin and dITM > itm_margin (the paper's
    candidate and its ITM confirmation), ``itc`` dITC < -itc_alone by itself, ``segment``
    its aITC more than z_margin MADs above its field's median. Then the per-field cap (the
    most suspect first: highest z under ``segment``, else most negative dITC), and at least
    one segment of every text kept (the least suspect). `z`: :func:`segment_z` of `scores`
    when the caller has it already."""
    unknown = sorted(set(rules) - set(RULES))
    if unknown or not rules:
        raise ValueError(f"unknown screening rule {unknown}: the arms are {', '.join(RULES)}")
    if "segment" not in rules:
        z = {}
    elif z is None:
        z = segment_z(scores)

    def suspicion(i: int, name: str) -> float:
        if "segment" in rules:
            return z.get((i, name), -math.inf)
        return -scores[i][name][0]

    by_field: dict[str, list[tuple[float, int]]] = {}
    present: dict[str, int] = {}
    for i, per in scores.items():
        for name, (ditc, ditm, *_) in per.items():
            present[name] = present.get(name, 0) + 1
            noise = (
                ("paper" in rules and ditc < -itc_margin and ditm > itm_margin)
                or ("itc" in rules and ditc < -itc_alone)
                or z.get((i, name), -math.inf) > z_margin
            )
            if noise:
                by_field.setdefault(name, []).append((-suspicion(i, name), i))
    flagged: dict[int, set[str]] = {}
    for name, items in by_field.items():
        items.sort()
        for _, i in items[: math.floor(field_cap * present[name] + 1e-9)]:
            flagged.setdefault(i, set()).add(name)
    for i, names in flagged.items():
        if len(names) >= len(scores[i]):  # every segment flagged: keep the least suspect
            names.discard(max(names, key=lambda n: (-suspicion(i, n), n)))
    return {i: n for i, n in flagged.items() if n}
