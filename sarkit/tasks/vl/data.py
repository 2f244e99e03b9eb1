"""The builder's files as training pairs, and the models the VL heads train and reload.

A VL head trains a KnowLIP (``KnowLIP.from_run`` of a pretrain/SCIO run, or a new one for
``--init random``) wrapped in a small module whose ``forward`` returns the head's loss:
:class:`RetrievalModel` (ITC with momentum distillation + ITM with hard negatives) or
:class:`DecoderModel` (the decoder's LM loss of the caption, or of the answer after the
question, given the image). A fine-tuned run folder holds ``text/`` (the BERT config and
tokenizer, no weights) and the head's config (``model``: the KnowLIP config) in
config.json, so :func:`load_model` rebuilds it from the folder alone.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sarkit import log
from sarkit.errors import SarkitError
from sarkit.tasks.finetune import HeadTask
from sarkit.train.task import MomentumTask

CAPTION_FIELD = "caption"


def load_jsonl(path: str | Path) -> list[dict]:
    """Every record of a task's data file, each marked with its line (``_line``) so a skipped
    one can be named; read by the records reader every stage uses."""
    from sarkit.records import read_records

    path = Path(path)
    if not path.is_file():
        raise SarkitError(f"{path}: no such file")
    rows = [dict(item.record, _line=item.line) for item in read_records([str(path)], None, ())]
    if not rows:
        raise SarkitError(f"{path}: no records")
    return rows


def check_rows(rows: list[dict], source: str, kind: str) -> list[dict]:
    """The rows a task can use; the others named (first one) and counted on stderr.

    image rows need ``path`` and non-empty ``captions``; vqa rows ``path``, ``question``
    and ``answer``.
    """
    good, bad = [], []
    for r in rows:
        if not r.get("path"):
            bad.append((r, "no image path"))
        elif kind == "vqa":
            if not str(r.get("question") or "").strip():
                bad.append((r, "no question"))
            elif not str(r.get("answer") or "").strip():
                bad.append((r, "question without an answer"))
            else:
                good.append(r)
        else:
            caps = r.get("captions")
            if isinstance(caps, str):
                caps = [caps]
            caps = [c for c in caps or [] if str(c or "").strip()] if isinstance(caps, list) else []
            if not caps:
                bad.append((r, "no non-empty caption"))
            else:
                good.append({**r, "captions": caps})
    if bad:
        r, why = bad[0]
        log.warn(
            f"{source}: skipped {len(bad)} record(s) ({why}: line {r.get('_line')}, "
            f"{r.get('id')}); using {len(good)}"
        )
    if not good:
        raise SarkitError(f"{source}: no usable {kind} record")
    return good


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict], str]:
    """(train, held out, how): the rows' own ``split`` when they carry one, else seeded."""
    if any("split" in r for r in rows):
        train = [r for r in rows if r.get("split", "train") == "train"]
        held = [r for r in rows if r.get("split") in ("test", "val")]
        return train, held, "given"
    keys = sorted({str(r.get("image", r.get("id"))) for r in rows})
    random.Random(seed).shuffle(keys)
    n = max(1, round(len(keys) * fraction)) if len(keys) > 1 else 0
    held_keys = set(keys[:n])
    held = [r for r in rows if str(r.get("image", r.get("id"))) in held_keys]
    return [r for r in rows if r not in held], held, "seeded"


def vocabulary(data: str | Path) -> dict | None:
    """answers.json beside the data (the builder writes it), or None."""
    path = Path(data).parent / "answers.json"
    if not path.exists():
        return None
    try:
        vocab = json.loads(path.read_text())
        vocab["answers"] = [str(a) for a in vocab["answers"]]
        return vocab
    except (ValueError, KeyError, TypeError) as exc:
        raise SarkitError(f"{path}: not an answer vocabulary ({exc})") from None


# ---------------------------------------------------------------- models


def freeze(modules: Sequence[nn.Module]) -> None:
    """Parts a head's loss never reaches: no gradients, no optimiser state, and nothing DDP
    waits for (it fails on parameters without a gradient); their weights stay in the run."""
    for module in modules:
        for p in module.parameters() if isinstance(module, nn.Module) else [module]:
            p.requires_grad_(False)


class RetrievalModel(nn.Module):
    """ITC (momentum distillation, queue; every caption of an image is a positive) + ITM.

    Under DDP the ITC negatives and targets are the momentum features of every rank's
    batch (all-gathered, no gradient: they are keys, as the queue's entries are) plus the
    queue, and ITM draws its hard negatives from every rank's batch (``_itm_loss``); so a
    step's ITC loss does not depend on how its global batch is split over ranks.
    """

    def __init__(self, lip: nn.Module):
        super().__init__()
        self.lip = lip
        freeze([lip.decoder])

    def forward(self, images, input_ids, attention_mask, groups, momentum, alpha):
        from sarkit.model.knowlip import gather

        lip = self.lip
        temp = lip.temperature()
        tokens = lip.image_tokens(images)
        img_feat = lip.image_feature(tokens)
        txt_feat = lip.text_feature(input_ids, attention_mask)
        with torch.no_grad():
            img_m, txt_m = momentum.features(images, input_ids, attention_mask)
            img_m_all, txt_m_all, groups_all = gather(img_m), gather(txt_m), gather(groups)
            q_img, q_txt, q_group = momentum.queued()
            img_all, txt_all = torch.cat([img_m_all, q_img]), torch.cat([txt_m_all, q_txt])
            pos = (groups[:, None] == torch.cat([groups_all, q_group])[None, :]).float()
            hard = pos / pos.sum(1, keepdim=True)
            t_i2t = alpha * F.softmax(img_m @ txt_all.T / temp, dim=1) + (1 - alpha) * hard
            t_t2i = alpha * F.softmax(txt_m @ img_all.T / temp, dim=1) + (1 - alpha) * hard
        loss_i2t = -(F.log_softmax(img_feat @ txt_all.T / temp, 1) * t_i2t).sum(1).mean()
        loss_t2i = -(F.log_softmax(txt_feat @ img_all.T / temp, 1) * t_t2i).sum(1).mean()
        itc = (loss_i2t + loss_t2i) / 2
        momentum.enqueue(img_m_all, txt_m_all, groups_all)
        itm = lip._itm_loss(
            tokens, img_feat, txt_feat, input_ids, attention_mask, temp, groups, groups_all
        )
        return {"loss": itc + itm, "itc": itc, "itm": itm, "temp": temp.detach().clone()}


class DecoderModel(nn.Module):
    """The decoder's LM loss of the target tokens after a prefix (a prompt or a question)."""

    def __init__(self, lip: nn.Module, label_smoothing: float = 0.1):
        super().__init__()
        self.lip = lip
        self.label_smoothing = float(label_smoothing)
        freeze([lip.text, lip.text_proj, lip.vision_proj, lip.itm_head, lip.temp])

    def forward(self, images, input_ids, attention_mask, prefix_lengths):
        from sarkit.model.decoder import lm_loss

        states = self.lip.image_to_text(self.lip.image_tokens(images))
        loss = lm_loss(
            self.lip.decoder,
            input_ids,
            attention_mask,
            states,
            prefix_lengths=prefix_lengths,
            label_smoothing=self.label_smoothing if self.training else 0.0,
        )
        return {"loss": loss, "lm": loss.detach()}


# ---------------------------------------------------------------- datasets and collates


class PairDataset(torch.utils.data.Dataset):
    """(image tensor, pair index); ``pairs[i]`` = (image row, text or (question, answer))."""

    def __init__(self, pairs: list[tuple[dict, Any]], tiles: Any):
        self.pairs = pairs
        self.tiles = tiles  # sarkit.train.data.TileDataset over the pairs' image rows

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.tiles.set_epoch(epoch)

    def __getitem__(self, index: int):
        # an unreadable tile is replaced by the next readable pair (named once on stderr)
        return self.tiles[index]


class RetrievalCollate:
    """Images, the captions tokenised as one segment each, and the image as the ITC group."""

    def __init__(self, pairs: list[tuple[dict, str]], codec: Any):
        self.pairs, self.codec = pairs, codec
        names = sorted({str(p[0]["id"]) for p in pairs})
        self.group = {n: i for i, n in enumerate(names)}

    def __call__(self, batch):
        images = torch.stack([b[0] for b in batch])
        pairs = [self.pairs[b[1]] for b in batch]
        enc = self.codec.encode([[text] for _, text in pairs])
        groups = torch.tensor([self.group[str(row["id"])] for row, _ in pairs])
        return {
            "images": images,
            "input_ids": enc.input_ids,
            "attention_mask": enc.attention_mask,
            "groups": groups,
        }


@dataclass
class Tokens:
    """Token ids a decoder head needs (BERT's vocabulary)."""

    tokenizer: Any
    max_tokens: int

    @property
    def bos(self) -> int:
        from sarkit.model.decoder import dec_token_id

        return dec_token_id(self.tokenizer)

    @property
    def eos(self) -> int:
        return int(self.tokenizer.sep_token_id)

    @property
    def pad(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


class DecoderCollate:
    """LM rows ``[DEC] prefix target [SEP]``: caption after the prompt, or answer after the
    question (``pairs[i][1]`` is (prefix, target))."""

    def __init__(self, pairs: list[tuple[dict, tuple[str, str]]], tokens: Tokens):
        self.pairs, self.tokens = pairs, tokens

    def __call__(self, batch):
        from sarkit.model.decoder import lm_inputs

        t = self.tokens
        images = torch.stack([b[0] for b in batch])
        texts = [self.pairs[b[1]][1] for b in batch]
        ids, mask, lengths = lm_inputs(
            [t.ids(p) for p, _ in texts],
            [t.ids(x) for _, x in texts],
            t.bos,
            t.eos,
            t.pad,
            t.max_tokens,
        )
        return {
            "images": images,
            "input_ids": ids,
            "attention_mask": mask,
            "prefix_lengths": lengths,
        }


# ---------------------------------------------------------------- building and loading


def tile_dataset(rows: Sequence[dict], base: Path, config: Any, augment: bool, seed: int):
    from sarkit.train.data import Augment, TileDataset

    return TileDataset(
        rows,
        config.image_size,
        base,
        Augment(crop_scale=(0.8, 1.0)) if augment else None,
        seed,
        config.image_mean,
        config.image_std,
        config.center_crop,
    )


def build_lip(options: Any, train_rows: Sequence[dict], base: Path) -> tuple[nn.Module, dict]:
    """(KnowLIP, provenance) from ``--init``: a sarkit run folder, or ``random`` (a new ViT
    of ``--vision`` and the offline MiniLM text towers)."""
    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig, run_config
    from sarkit.model.weights import load_weights
    from sarkit.train.data import pixel_stats
    from sarkit.train.pretrain import resolve_init

    init = str(options.init or "random")
    extra = options.extra
    if init == "random":
        config = KnowLIPConfig(
            vision=options.vision,
            image_size=options.image_size,
            text=extra.get("text"),
            text_layers=extra.get("text_layers"),
            embed_dim=int(extra.get("embed_dim") or 256),
            fields=(CAPTION_FIELD,),
            max_tokens=int(extra.get("max_tokens") or 64),
            queue_size=int(extra.get("queue_size") or 4096),
        )
        config.image_mean, config.image_std = pixel_stats(list(train_rows), base)
        lip = KnowLIP(config)
        return lip, {"kind": "random", "vision": config.vision}
    if init.startswith("timm:"):
        raise SarkitError(
            f"--init {init}: the VL heads need a sarkit pretrain/SCIO run (its text towers "
            "and decoder) or 'random'"
        )
    paths = resolve_init(init)
    config = run_config(paths[0].parent)
    lip = KnowLIP(config, pretrained_text=False)
    load_weights(lip, paths[1])
    log.info(f"initialised from {init} ({config.vision}, image size {config.image_size})")
    from sarkit.tasks.backbone import sha256

    provenance = {
        "kind": "run",
        "run": str(Path(init).resolve()),
        "weights": str(paths[1].resolve()),
        "sha256": sha256(paths[1]),
    }
    return lip, provenance


def save_text_config(lip: nn.Module, tokenizer: Any, out: Path) -> None:
    """The BERT config and tokenizer (no weights: they are in the run's safetensors)."""
    import shutil

    folder = Path(out) / "text"
    tmp = Path(out) / ".text.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = lip.text.config.__class__.from_dict(lip.text.config.to_dict())
    config.is_decoder = False
    config.add_cross_attention = False
    config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def model_config_dict(lip: nn.Module) -> dict:
    from dataclasses import asdict

    return asdict(lip.config)


def load_model(run: Path, weights: str = "last") -> tuple[nn.Module, dict, Any]:
    """(head module in eval mode, run config, tokenizer) of a fine-tuned VL run folder."""
    from transformers import AutoTokenizer

    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig
    from sarkit.model.weights import load_weights
    from sarkit.tasks import runfolder

    run = Path(run)
    config = runfolder.read_config(run)
    if "model" not in config:
        raise SarkitError(f"{run}/config.json: no 'model' (not a sarkit VL run)")
    mc = KnowLIPConfig.from_dict(config["model"])
    mc.text = str(run / "text")
    mc.vision_weights = None
    lip = KnowLIP(mc, pretrained_text=False)
    model = RetrievalModel(lip) if config["task"] == "retrieval" else DecoderModel(lip)
    load_weights(model, runfolder.weights_path(run, weights))
    model.eval()
    return model, config, AutoTokenizer.from_pretrained(str(run / "text"))


class FeatureModel:
    """Image and text ITC features of a pretrain run (``model.json``) or a fine-tuned VL run
    (for ``eval text --plot``)."""

    def __init__(self, lip: nn.Module, codec: Any):
        self.lip, self.codec = lip, codec

    @classmethod
    def load(cls, run: Path) -> FeatureModel:
        from sarkit.model.knowlip import KnowLIP, run_config
        from sarkit.model.text import TextCodec

        run = Path(run)
        if (run / "model.json").exists():
            lip = KnowLIP.from_run(run)
            fields = run_config(run).fields
        elif (run / "config.json").exists():
            model, _, _ = load_model(run)
            lip = model.lip
            fields = lip.config.fields
        else:
            raise SarkitError(
                f"--run {run}: not a sarkit run folder (no model.json or config.json)"
            )
        lip.eval()
        codec = TextCodec.from_pretrained(lip.config.text, fields, lip.config.max_tokens)
        return cls(lip, codec)

    def text_of(self, record: dict) -> Any:
        if isinstance(record.get("texts"), dict):
            return record["texts"]
        caps = record.get("captions") or [record.get("caption") or ""]
        return [str(caps[0])]

    @torch.no_grad()
    def image_features(self, paths: Sequence[str], base: Path, batch: int = 32) -> torch.Tensor:
        rows = [{"id": str(i), "path": p} for i, p in enumerate(paths)]
        tiles = tile_dataset(rows, base, self.lip.config, False, 0)
        out = []
        for i in range(0, len(rows), batch):
            images = torch.stack([tiles[k][0] for k in range(i, min(len(rows), i + batch))])
            out.append(self.lip.encode_images(images)[1])
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: Sequence[Any], batch: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch):
            out.append(self.lip.encode_texts(self.codec.encode(list(texts[i : i + batch]))))
        return torch.cat(out)


class RetrievalTask(MomentumTask, HeadTask):
    """A head task plus the momentum towers and queue, kept outside the engine (fp32) as in
    pretraining; ``momentum`` and ``alpha`` are set by the head."""

    momentum: Any = None
    alpha: float = 0.4

    def live(self, module: Any) -> Any:
        return module.lip

    def inputs(self, batch: dict, device: torch.device, dtype: torch.dtype, step: int) -> dict:
        from sarkit.train.task import to_device

        kwargs = to_device(batch, device, dtype)
        kwargs.update(momentum=self.momentum, alpha=self.alpha)
        return kwargs
