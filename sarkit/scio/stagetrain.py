"""SCIO's training stages on the shared loop: pretrain's KnowLIP task, with the decoder's LM
trained on the rewriting layout (``infill``) and the noise pool kept out of its targets.

ITC and ITM train on the whole current text; the MLM targets skip the segments in a record's
``mlm_exclude`` (ImageTextCollate), and so does the LM: its target is one non-excluded
segment per sample, written from the image, the other non-excluded segments and the field
label. The target is drawn from (seed, epoch, record), so a resumed stage sees the same rows.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import torch

from sarkit.scio import infill
from sarkit.train.data import ImageTextCollate
from sarkit.train.pretrain import KnowLIPTask


class ScioCollate(ImageTextCollate):
    def __init__(self, dataset: Any, codec: Any, seed: int):
        super().__init__(dataset.records, codec)
        self.dataset = dataset
        self.seed = int(seed)

    def lm_rows(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from sarkit.model.decoder import dec_token_id, lm_inputs

        codec = self.codec
        prefixes, targets = [], []
        for i in index:
            rec = self.records[i]
            segs = codec.segments(rec["texts"])
            excluded = {
                codec.fields.index(f) for f in rec.get("mlm_exclude") or () if f in codec.fields
            }
            can = [j for j, s in enumerate(segs) if s.strip() and j not in excluded]
            rng = random.Random(f"{self.seed}/{self.dataset.epoch}/{i}")
            j = rng.choice(can) if can else 0
            prefixes.append(infill.prefix(codec, segs, j, excluded))
            targets.append(codec._tokens(segs[j]) if can else [])
        return lm_inputs(
            prefixes,
            targets,
            dec_token_id(codec.tokenizer),
            codec.sep_id,
            codec.pad_id,
            codec.max_tokens,
        )

    def __call__(self, batch: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        out = super().__call__(batch)
        out["lm_ids"], out["lm_mask"], out["lm_prefix"] = self.lm_rows(out["index"].tolist())
        return out


class ScioTask(KnowLIPTask):
    name = "scio"

    def inputs(self, batch: dict, device: torch.device, dtype: torch.dtype, step: int) -> dict:
        kwargs = super().inputs(batch, device, dtype, step)
        for key in ("lm_ids", "lm_mask", "lm_prefix"):
            kwargs[key] = batch[key].to(device)
        return kwargs


def build_stage(records: list[dict], options: Any):
    """(task, dataset, collate) of one stage: pretrain's build, SCIO's task and collate. A
    model trained with the MLM decoder only also learns the LM here (rewrites need it)."""
    from sarkit.train.pretrain import build

    task, dataset, _ = build(records, options)
    model = task.model
    if model.config.decoder_loss == "mlm":
        model.config.decoder_loss = "both"
    task = ScioTask(model, task.momentum, task.codec, options)
    return task, dataset, ScioCollate(dataset, task.codec, options.seed)


def train_stage(records: list[dict], options: Any, init: str | None, out: Path) -> Path:
    """Train one stage into `out` (resumable: a rerun continues from its last checkpoint)."""
    from sarkit.train.loop import Loop

    resume = "latest" if (out / "checkpoints" / "latest").exists() else None
    stage = dataclasses.replace(options, output=out, init=init, resume=resume, name=out.name)
    task, dataset, collate = build_stage(records, stage)
    loop = Loop(task, dataset, collate, stage)
    task.rampup = (
        stage.alpha_rampup_steps
        if stage.alpha_rampup_steps is not None
        else max(1, round(loop.steps_per_epoch))
    )
    return loop.fit()


def finish_stage(folder: Path, keep_checkpoints: bool) -> None:
    """Mark a training stage done; its checkpoints go unless asked to stay (the next stage
    starts from the stage's exported model, and a done stage is never resumed: a tiny
    model's checkpoint with its optimiser state is already some 400 MB)."""
    import shutil

    from sarkit.atomic import write_text
    from sarkit.launch import launch_rank

    write_text(folder / "DONE", "done\n")
    if not keep_checkpoints and launch_rank() == 0:
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
