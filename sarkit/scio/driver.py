"""The SCIO stage driver (Algorithm 1), resumable by finished stage.

Stages, in a run folder ``-o DIR``::

    stages/01-train           representation learning (ITC + ITM + MLM/LM), skipped with
                              --init unless --epochs-per-stage asks for it
    stages/02-screen-r1       screening: dITC/dITM per segment, the noise pool
    stages/03-train-r1        training with the noise pool kept out of MLM/LM targets
    stages/04-rewrite-r1      reconstruction: rewritten or removed
    stages/05-train-r1b       training on the refined texts (the feedback loop)
    ... screen/train/rewrite/train again for each further --rounds

A training stage is done when its folder holds DONE (the loop checkpoints inside it, so a
rerun continues a half-trained stage too); a screening or rewriting stage when its
records.jsonl exists (written atomically). A screening stage keeps a journal of finished
batches (one per rank under torchrun: each rank screens every world-th batch, the shares
are gathered): killed during screening, the rerun scores only what is left, with any number
of ranks, and the result is the same. The refined records go to refined.jsonl (or
stdout), with report.md, the dITC and aITC z histograms and, in model/, the last stage's model.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

from sarkit import log
from sarkit.atomic import write_text
from sarkit.errors import SarkitError
from sarkit.launch import launch_rank
from sarkit.scio.options import ScioOptions
from sarkit.scio.records import Skipped, problem


def plan(options: ScioOptions) -> list[tuple[str, str, int]]:
    """(folder name, kind, round) of every stage."""
    kinds: list[tuple[str, int]] = []
    if not options.init or options.epochs_per_stage_given:
        kinds.append(("train", 0))
    for r in range(1, options.rounds + 1):
        kinds += [("screen", r), ("train", r), ("rewrite", r), ("train", -r)]
    names = []
    for n, (kind, r) in enumerate(kinds, start=1):
        suffix = "" if r == 0 else (f"-r{r}" if r > 0 else f"-r{-r}b")
        names.append((f"{n:02d}-{kind}{suffix}", kind, abs(r)))
    return names


def write_records(path: Path, records: list[dict]) -> None:
    from sarkit.records import dumps

    write_text(path, "".join(dumps(r) + "\n" for r in records))


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class Judge:
    """A stage's model, bank and image reader for screening and rewriting."""

    def __init__(
        self,
        run: str,
        records: list[dict],
        pool: list[int],
        options: ScioOptions,
        device: Any = None,
    ):
        import torch
        from safetensors.torch import load_file

        from sarkit.model.decoder import dec_token_id
        from sarkit.model.knowlip import KnowLIP, Momentum, run_config
        from sarkit.model.text import TextCodec
        from sarkit.model.weights import load_weights
        from sarkit.scio.screen import Scorer, queue_bank, records_bank
        from sarkit.train.data import ImageTextCollate, TileDataset, to_tensor
        from sarkit.train.pretrain import resolve_init

        config_path, weights, momentum_path = resolve_init(run)
        config = run_config(config_path.parent)
        if device is None:  # one process (under torchrun _process_group gives the rank's)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device = device
        model = KnowLIP(config, pretrained_text=False)
        load_weights(model, weights)
        self.model = model.to(self.device).eval()
        self.codec = TextCodec.from_pretrained(config.text, config.fields, config.max_tokens)
        self.dec_id = dec_token_id(self.codec.tokenizer)
        self.pool = [records[i] for i in pool]
        base = Path(options.records_path).parent if options.records_path else None
        self.dataset = TileDataset(
            self.pool, config.image_size, base, None, options.seed,
            config.image_mean, config.image_std, config.center_crop,
        )  # fmt: skip
        collate = ImageTextCollate(self.pool, self.codec)
        self.groups = [collate.group(i) for i in range(len(self.pool))]
        self._to_tensor = to_tensor
        momentum = Momentum(model, config.queue_size, config.momentum)
        bank = None
        if momentum_path is not None:
            momentum.load_state_dict(load_file(str(momentum_path)), strict=True)
            bank = queue_bank(momentum)
        if bank is None:
            log.warn(f"{run}: no momentum queue; the negative bank is made from the records")
            if momentum_path is None:
                momentum.copy_from(model)
            momentum.to(self.device)
            ok = []
            for i in range(len(self.pool)):
                try:
                    ok.append((self.image(i), i))
                except SarkitError:
                    continue
            images = torch.stack([t for t, _ in ok]).to(self.device)
            bank = records_bank(
                model, momentum, self.codec, images,
                [self.pool[i]["texts"] for _, i in ok], [self.groups[i] for _, i in ok],
            )  # fmt: skip
        self.scorer = Scorer(self.model, self.codec, bank, self.device)

    def image(self, i: int):
        ds = self.dataset
        arr = ds.read(i)
        if ds.center_crop < 1.0:
            h, w = arr.shape
            ch, cw = max(1, round(h * ds.center_crop)), max(1, round(w * ds.center_crop))
            top, left = (h - ch) // 2, (w - cw) // 2
            arr = arr[top : top + ch, left : left + cw]
        return self._to_tensor(arr, ds.image_size, None, None, ds.mean, ds.std)


def layout(records: list[dict], options: ScioOptions) -> tuple[str, ...]:
    if options.init:
        from sarkit.model.knowlip import run_config
        from sarkit.train.pretrain import resolve_init

        return tuple(run_config(resolve_init(options.init)[0].parent).fields)
    from sarkit.train.pretrain import choose_fields, usable_records

    return choose_fields(usable_records(records, options.records_path or "records"), options.fields)


def screen_stage(
    current: list[dict],
    pool: list[int],
    run: str,
    options: ScioOptions,
    folder: Path,
    rnd: int,
) -> tuple[list[dict], dict[int, str]]:
    """Screen the pool and mark the noise: (records, {pool index: why unreadable}).

    Under torchrun each rank screens every world-th batch of the one-process batching
    (screen_share) and the shares are all-gathered, so every rank ends with the same merged
    scores and records as one process would have, whatever the number of ranks.
    """
    from sarkit.scio.screen import (
        MIN_FIELD,
        decide,
        journal_files,
        journal_path,
        merge_shares,
        screen_share,
        segment_z,
    )

    rank, world, device = _process_group(options)
    judge = Judge(run, current, pool, options, device)
    share = screen_share(
        judge.scorer, judge.image, judge.pool, judge.groups, judge.codec,
        options.screen_batch, journal_path(folder, rank), rank, world, journal_files(folder),
    )  # fmt: skip
    shares = _every_ranks(share, world)
    scores, bad = merge_shares(shares, judge.pool, options.screen_batch, str(folder))
    zs = segment_z(scores)
    flagged = decide(
        scores, options.rules, options.itc_margin, options.itm_margin, options.field_cap,
        options.itc_alone_margin, options.segment_z, zs,
    )  # fmt: skip
    if "segment" in options.rules:
        few = sorted({f for per in scores.values() for f in per} - {f for _, f in zs})
        if few:
            log.warn(f"scio screen: fewer than {MIN_FIELD} screened segments of "
                     f"{', '.join(few)}: the 'segment' arm does not judge them")  # fmt: skip
    out = [copy.deepcopy(r) for r in current]
    for k, i in enumerate(pool):
        rec = out[i]
        if k in bad:
            rec.pop("mlm_exclude", None)
            continue
        if k not in scores:
            continue
        rec.setdefault("texts_original", copy.deepcopy(rec["texts"]))
        entry = rec.setdefault("scio", {})
        noisy = flagged.get(k, set())
        for name, (ditc, ditm, aitc) in scores.get(k, {}).items():
            seg = entry.get(name, {})
            seg.update(ditc=ditc, ditm=ditm, aitc=aitc, round=rnd)
            if (k, name) in zs:
                seg["aitc_z"] = round(zs[(k, name)], 4)
            if name in noisy:
                seg["decision"] = "noise"
            else:
                seg.setdefault("decision", "kept")
            entry[name] = seg
        rec["mlm_exclude"] = sorted(noisy, key=judge.codec.fields.index)
    return out, bad


def rewrite_stage(
    current: list[dict], pool: list[int], run: str, options: ScioOptions
) -> list[dict]:
    """Rewrite or remove the noise pool's segments; under torchrun each rank rewrites a
    share of the one-process chunks and the shares are all-gathered, so every rank ends with
    the records one process would have written."""
    from sarkit.scio.reconstruct import rewrite

    rank, world, device = _process_group(options)
    judge = Judge(run, current, pool, options, device)
    flagged = {}
    for k, i in enumerate(pool):
        names = set(current[i].get("mlm_exclude") or ())
        if names:
            flagged[k] = names
    result = rewrite(
        judge.model, judge.scorer, judge.codec, judge.pool, judge.groups, flagged,
        judge.image, judge.dec_id, options.max_new_tokens, options.screen_batch, rank, world,
    )  # fmt: skip
    result = {k: v for share in _every_ranks(result, world) for k, v in share.items()}
    out = [copy.deepcopy(r) for r in current]
    for k, i in enumerate(pool):
        rec = out[i]
        rec.pop("mlm_exclude", None)
        for name, new in result.get(k, {}).items():
            seg = rec["scio"][name]
            seg["rewrite"] = {key: new[key] for key in ("text", "ditc", "ditm")}
            if new["accepted"]:
                seg["decision"] = "rewritten"
                rec["texts"][name] = new["text"]
            else:
                seg["decision"] = "removed"
                rec["texts"].pop(name, None)
    return out


def run_scio(records: list[dict], options: ScioOptions) -> Path:
    """Run every stage not yet done; return the run folder."""
    from sarkit.scio import report
    from sarkit.scio.stagetrain import finish_stage, train_stage

    out = Path(options.output)
    out.mkdir(parents=True, exist_ok=True)
    fields = layout(records, options)
    skipped = Skipped()
    current = [copy.deepcopy(rec) for rec in records]
    pool = []
    for i, rec in enumerate(records):
        why = problem(rec, fields)
        if why is None:
            pool.append(i)
        else:
            skipped.add(rec, why)
    if len(pool) < 2:
        raise SarkitError(
            f"{options.records_path}: {len(pool)} record(s) SCIO can judge "
            f"({skipped.summary() or 'none given'}); it needs at least 2"
        )
    model_run = options.init
    last_bad: dict[int, str] = {}
    stages = plan(options)
    last_train = [n for n, kind, _ in stages if kind == "train"][-1]
    for name, kind, rnd in stages:
        folder = out / "stages" / name
        if kind == "train":
            if not (folder / "DONE").exists():
                log.info(f"scio: stage {name}")
                train_stage([current[i] for i in pool], options, model_run, folder)
                finish_stage(folder, keep_checkpoints=name == last_train)
            model_run = str(folder)
            continue
        done = folder / "records.jsonl"
        if done.exists():
            current = read_records(done)
            if kind == "screen":
                last_bad = {
                    int(k): v for k, v in json.loads((folder / "bad.json").read_text()).items()
                }
        else:
            log.info(f"scio: stage {name}")
            # every rank screens or rewrites a share; all get the merged records, rank 0
            # writes them
            if kind == "screen":
                current, last_bad = screen_stage(current, pool, model_run, options, folder, rnd)
                if launch_rank() == 0:
                    write_text(
                        folder / "bad.json", json.dumps({str(k): v for k, v in last_bad.items()})
                    )
            else:
                current = rewrite_stage(current, pool, model_run, options)
            if launch_rank() == 0:
                write_records(done, current)
        if kind == "screen" and options.screen_only:
            break
    if launch_rank() != 0:
        return out
    for k in sorted(last_bad):
        skipped.add(records[pool[k]], "tile", f" ({last_bad[k]})")
    if options.screen_only:
        write_records(out / "screened.jsonl", current)
    else:
        final = out / "model"
        if model_run and not (final / "model.safetensors").exists():
            _copy_model(Path(model_run), final)
        write_records(out / "refined.jsonl", current)
    report.write(out, current, fields, skipped, options)
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_model(run: Path, final: Path) -> None:
    """The last stage's exported model (model.json, weights, momentum, export/) as model/
    (hard links where the file system has them: no second copy of the weights)."""
    tmp = final.parent / ".model.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("model.json", "model.safetensors", "momentum.safetensors"):
        if (run / name).exists():
            _link_or_copy(str(run / name), str(tmp / name))
    if (run / "export").exists():
        shutil.copytree(run / "export", tmp / "export", copy_function=_link_or_copy)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _every_ranks(share: Any, world: int) -> list:
    """Every rank's `share`, in rank order (this one's alone in one process)."""
    if world <= 1:
        return [share]
    import torch.distributed as dist

    shares: list = [None] * world
    dist.all_gather_object(shares, share)
    return shares


def _process_group(options: ScioOptions) -> tuple[int, int, Any]:
    """(rank, world, device): torchrun's process group, joined as the training stages join
    it (DeepSpeed's when --deepspeed), so a screening before any training can gather."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from sarkit.train.engine import setup_distributed

    return setup_distributed(bool(options.deepspeed))


def scio(records: list[dict], options: ScioOptions) -> Path:
    """Run SCIO (and the --ablation arms); the process group is torn down cleanly.

    Under torchrun every rank trains, screens a share of the batches and rewrites a share
    of the chunks from the stage's exported model (gathered: the merged records are a
    one-process run's, byte for byte, for the same stage models).
    """
    from sarkit.train.engine import teardown_distributed

    try:
        out = run_scio(records, options)
        if options.ablation and not options.screen_only:
            from sarkit.scio.ablation import run_ablation

            run_ablation(records, options)
    except BaseException:
        teardown_distributed(clean=False)
        raise
    teardown_distributed()
    return out
