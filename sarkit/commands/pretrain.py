"""`sarkit pretrain`: train SAR-KnowLIP (ITC + ITM + MLM) on captioned records."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import typer

from sarkit import log, plugins
from sarkit.errors import SarkitError, UsageError
from sarkit.model.visionargs import parse_vision_args
from sarkit.outputs import check_new_run
from sarkit.ranges import FRACTION, NON_NEGATIVE, POSITIVE, number_in

# options pretrain shares with scio (whose training stages are pretrain's)
CROSS_ATTENTION_LR_SCALE = typer.Option(
    None,
    "--cross-attention-lr-scale",
    parser=NON_NEGATIVE,
    help="lr factor for the text tower's and decoder's cross-attention layers (new "
    "weights; default: --text-lr-scale's).",
)
ITM_SEGMENT_NEGATIVES = typer.Option(
    None,
    "--itm-segment-negatives",
    parser=FRACTION,
    help="Share of ITM negatives made of the image's own text with one segment swapped "
    "in from another image (sarkit's addition; default: the --init run's, else "
    "the model's default).",
)


def check_output_folder(path: Path) -> None:
    """A run folder that cannot be made is named now, not after minutes of model loading."""
    if path.exists() and not path.is_dir():
        raise SarkitError(f"-o {path}: exists and is not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SarkitError(f"-o {path}: {parent} is not a folder")
            if not os.access(parent, os.W_OK):
                raise SarkitError(f"-o {path}: {parent} is not writable")
            break


def check_deepspeed(spec: str | None) -> None:
    """A --deepspeed value that is neither a preset nor a file, or DeepSpeed missing, is named
    before any model is built (the training stages share this)."""
    if not spec:
        return
    from sarkit.train.engine import DS_PRESETS, import_deepspeed

    if spec not in DS_PRESETS and not Path(spec).is_file():
        known = ", ".join(DS_PRESETS)
        raise UsageError(f"--deepspeed {spec}: neither a preset ({known}) nor a JSON file")
    import_deepspeed()


def command(
    records: list[Path] = typer.Argument(
        ...,
        help="Captioned records (JSON Lines with 'path', 'texts'), or tar shards made by "
        "`sarkit shard` (shards/*.tar). Texts are tokenised once and cached beside them.",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Run folder."),
    val: Path = typer.Option(
        None,
        "--val",
        help="Held-out records (JSON Lines, as the training ones): retrieval R@1/5/10 both "
        "ways at each evaluation pass, in eval.csv.",
    ),
    eval_every: int = typer.Option(
        0, "--eval-every", min=0, help="Evaluate every N steps (0: each epoch, and at the end)."
    ),
    vision: str = typer.Option(
        "vit_base_patch16_224", "--vision", help="timm ViT name, or tiny/small/base/large."
    ),
    init: str = typer.Option(
        None,
        "--init",
        help="Start from a run or checkpoint folder (its architecture, weights, momentum "
        "towers and queue); the schedule starts anew.",
    ),
    vision_weights: str = typer.Option(
        None, "--vision-weights", help="'timm' (pretrained download) or a weights file."
    ),
    vision_args: str = typer.Option(
        None,
        "--vision-args",
        parser=parse_vision_args,
        help="timm constructor keywords for the ViT, e.g. patch_size=2,depth=6 (recorded "
        "in export/vision.json, so fine-tunes rebuild it).",
    ),
    text: str = typer.Option(
        None, "--text", help="BERT name or folder (default: offline all-MiniLM-L6-v2)."
    ),
    text_layers: int = typer.Option(None, "--text-layers", help="Keep only the first N layers."),
    image_size: int = typer.Option(224, "--image-size", min=16),
    center_crop: float = typer.Option(
        1.0,
        "--center-crop",
        parser=number_in(0, 1, lo_open=True),
        help="Keep this side fraction of each tile (centred) first.",
    ),
    epochs: int = typer.Option(12, "--epochs", min=1),
    max_steps: int = typer.Option(
        None, "--max-steps", min=1, help="Stop after this many optimiser steps."
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Per process, per micro-batch."),
    grad_accum: int = typer.Option(
        1, "--grad-accum", min=1, help="Micro-batches per optimiser step (gradient accumulation)."
    ),
    lr: float = typer.Option(3e-4, "--lr", parser=POSITIVE),
    warmup_steps: int = typer.Option(3000, "--warmup-steps", min=0),
    lr_decay: float = typer.Option(
        0.9, "--lr-decay", parser=FRACTION, help="Per-epoch factor after warm-up."
    ),
    weight_decay: float = typer.Option(0.05, "--weight-decay", parser=NON_NEGATIVE),
    text_lr_scale: float = typer.Option(
        1.0,
        "--text-lr-scale",
        parser=NON_NEGATIVE,
        help="lr factor for the pretrained text tower and decoder.",
    ),
    queue_size: int = typer.Option(20000, "--queue-size", min=0),
    embed_dim: int = typer.Option(256, "--embed-dim", min=1),
    max_tokens: int = typer.Option(256, "--max-tokens", min=3),
    fields: str = typer.Option(
        None, "--fields", help="Comma-separated text fields in order (default: the records')."
    ),
    alpha: float = typer.Option(
        0.4, "--alpha", parser=FRACTION, help="Momentum distillation weight."
    ),
    momentum: float = typer.Option(
        0.995,
        "--momentum",
        parser=FRACTION,
        help="EMA factor of the momentum encoders (lower for short runs).",
    ),
    pool: str = typer.Option("mean", "--pool", help="ITC features: mean of tokens, or cls."),
    decoder_loss: str = typer.Option(
        "both",
        "--decoder-loss",
        help="Decoder objective: mlm (the paper's), lm (causal, BLIP's; needed to generate "
        "captions, answers and SCIO rewrites) or both.",
    ),
    cross_attention_lr_scale: float = CROSS_ATTENTION_LR_SCALE,
    itm_segment_negatives: float = ITM_SEGMENT_NEGATIVES,
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16."),
    deepspeed: str = typer.Option(
        None,
        "--deepspeed",
        help="zero1, zero2, zero3, zero2-offload, zero3-offload or a JSON file.",
    ),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing"),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes."),
    no_augment: bool = typer.Option(False, "--no-augment"),
    save_every: int = typer.Option(1000, "--save-every", help="Checkpoint every N steps."),
    log_every: int = typer.Option(10, "--log-every"),
    resume: str = typer.Option(
        None,
        "--resume",
        help="'latest' or a checkpoint folder; one saved by another number of processes "
        "resumes too (ZeRO checkpoints are converted to DeepSpeed's universal format first).",
    ),
    seed: int = typer.Option(42, "--seed"),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="Stop before training when a record has a failed caption, no texts, or was "
        "dropped by the filter (default: skip and count them).",
    ),
) -> None:
    """Pretrain the SAR-KnowLIP model; works under torchrun and the deepspeed launcher."""
    from sarkit.train.options import PretrainOptions
    from sarkit.train.table import RecordFiles

    if precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"--precision {precision}: use fp32, bf16 or fp16")
    if decoder_loss not in ("mlm", "lm", "both"):
        raise UsageError(f"--decoder-loss {decoder_loss}: use mlm, lm or both")
    if pool not in ("mean", "cls"):
        raise UsageError(f"--pool {pool}: use mean or cls")
    check_output_folder(output)
    check_new_run(output, resume)
    if val is not None and not val.is_file():
        raise SarkitError(f"--val {val}: no such file")
    options = PretrainOptions(
        output=output,
        records_path=str(records[0]),
        val_path=str(val) if val else None,
        eval_every=eval_every,
        vision=vision,
        vision_weights=vision_weights,
        vision_args=dict(vision_args or {}),
        init=init,
        image_size=image_size,
        center_crop=center_crop,
        text=text,
        text_layers=text_layers,
        embed_dim=embed_dim,
        max_tokens=max_tokens,
        fields=tuple(f.strip() for f in fields.split(",") if f.strip()) if fields else None,
        queue_size=queue_size,
        alpha=alpha,
        momentum=momentum,
        pool=pool,
        decoder_loss=decoder_loss,
        itm_segment_negatives=itm_segment_negatives,
        cross_attention_lr_scale=cross_attention_lr_scale,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup_steps=warmup_steps,
        lr_decay=lr_decay,
        weight_decay=weight_decay,
        text_lr_scale=text_lr_scale,
        precision=precision,
        deepspeed=deepspeed,
        grad_checkpointing=grad_checkpointing,
        workers=workers,
        augment=not no_augment,
        save_every=save_every,
        log_every=log_every,
        resume=resume,
        seed=seed,
        strict=strict,
    )
    if [str(p) for p in records] == ["-"]:  # records on stdin: read into memory
        from sarkit.records import load_all

        data = load_all("-", required=("id", "path"))
    else:
        data = RecordFiles(records)
    check_deepspeed(deepspeed)
    # stdout carries records only: libraries (DeepSpeed's JIT builds, say) print there
    with contextlib.redirect_stdout(sys.stderr):
        run_dir = plugins.get_manager().hook.sarkit_pretrain(records=data, options=options)
    if run_dir is None:
        raise UsageError("no plugin implements pretraining")
    log.info(f"pretrained -> {run_dir}")
