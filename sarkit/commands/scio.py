"""`sarkit scio`: self-consistent iterative optimisation of the captions' segments."""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

import typer

from sarkit import log, plugins
from sarkit.commands.pretrain import (
    CROSS_ATTENTION_LR_SCALE,
    ITM_SEGMENT_NEGATIVES,
    check_deepspeed,
    check_output_folder,
)
from sarkit.errors import SarkitError, UsageError
from sarkit.ranges import FRACTION, NON_NEGATIVE, POSITIVE, number_in


def command(
    records: Path = typer.Argument(
        ..., help="Captioned records (JSON Lines with 'path', 'texts')."
    ),
    output: str = typer.Option(
        ...,
        "--output",
        "-o",
        help="Run folder (refined.jsonl inside); '-': refined records "
        "to stdout, the run folder in --run-dir.",
    ),
    run_dir: Path = typer.Option(None, "--run-dir", help="The run folder when -o is '-'."),
    init: str = typer.Option(None, "--init", help="Start from a trained run or checkpoint folder."),
    epochs_per_stage: int = typer.Option(
        None,
        "--epochs-per-stage",
        min=1,
        help="Epochs of each training stage (default 12); with --init, also trains stage 1.",
    ),
    max_steps: int = typer.Option(None, "--max-steps", min=1, help="Cap on each stage's steps."),
    rounds: int = typer.Option(1, "--rounds", min=1, help="Screen-filter-reconstruct rounds."),
    rule: str = typer.Option(
        "segment",
        "--rule",
        help="Which arms flag a segment as noise (comma list, any one suffices): 'segment' "
        "(the segment by itself fits the image badly: its L_ITC more than --segment-z MADs "
        "above its field's median), 'paper' (dITC < -(--itc-margin) and dITM > "
        "--itm-margin: the paper's rule), 'itc' (dITC < -(--itc-alone-margin)). Measured "
        "on MSTAR: docs/results.md, SCIO.",
    ),
    segment_z: float = typer.Option(
        3.0, "--segment-z", parser=NON_NEGATIVE, help="Arm 'segment': MADs above the median."
    ),
    itc_margin: float = typer.Option(
        0.0,
        "--itc-margin",
        parser=NON_NEGATIVE,
        help="Arm 'paper': dITC < -margin (nats; the paper's 0) and dITM > --itm-margin.",
    ),
    itm_margin: float = typer.Option(
        0.01,
        "--itm-margin",
        parser=number_in(0, 1),
        help="Arm 'paper': the ITM confirmation (the paper's 0).",
    ),
    itc_alone_margin: float = typer.Option(
        0.1,
        "--itc-alone-margin",
        parser=NON_NEGATIVE,
        help="Arm 'itc': noise without the ITM confirmation when dITC < -this (nats).",
    ),
    field_cap: float = typer.Option(
        0.3,
        "--field-cap",
        parser=FRACTION,
        help="At most this share of a field's segments flagged per round.",
    ),
    screen_batch: int = typer.Option(
        16, "--screen-batch", min=1, help="Images per screening batch."
    ),
    max_new_tokens: int = typer.Option(
        40, "--max-new-tokens", min=1, help="Length limit of a rewritten segment."
    ),
    screen_only: bool = typer.Option(
        False, "--screen-only", help="Stop after the first screening: screened records to stdout."
    ),
    ablation: bool = typer.Option(
        False,
        "--ablation",
        help="Table 8 rows (no SCIO / screen+filter / +reconstruct) on --heldout.",
    ),
    heldout: Path = typer.Option(None, "--heldout", help="Clean held-out records for --ablation."),
    ablation_vqa: Path = typer.Option(
        None,
        "--ablation-vqa",
        help="With --ablation: a VQA file of `finetune build`; each arm is fine-tuned on its "
        "train split and scored on its test split (Table 8's VQA column).",
    ),
    ablation_vqa_epochs: int = typer.Option(
        3, "--ablation-vqa-epochs", min=1, help="VQA fine-tuning epochs of each arm."
    ),
    ablation_vqa_lr: float = typer.Option(
        1e-4, "--ablation-vqa-lr", parser=POSITIVE, help="VQA fine-tuning peak lr of each arm."
    ),
    vision: str = typer.Option("vit_base_patch16_224", "--vision", help="From scratch: timm ViT."),
    text: str = typer.Option(None, "--text", help="From scratch: BERT name or folder."),
    text_layers: int = typer.Option(None, "--text-layers", help="Keep only the first N layers."),
    image_size: int = typer.Option(224, "--image-size", min=16),
    center_crop: float = typer.Option(1.0, "--center-crop", parser=number_in(0, 1, lo_open=True)),
    embed_dim: int = typer.Option(256, "--embed-dim", min=1),
    max_tokens: int = typer.Option(256, "--max-tokens", min=3),
    queue_size: int = typer.Option(20000, "--queue-size", min=0),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1),
    lr: float = typer.Option(3e-4, "--lr", parser=POSITIVE),
    warmup_steps: int = typer.Option(3000, "--warmup-steps", min=0),
    text_lr_scale: float = typer.Option(1.0, "--text-lr-scale", parser=NON_NEGATIVE),
    momentum: float = typer.Option(0.995, "--momentum", parser=FRACTION),
    cross_attention_lr_scale: float = CROSS_ATTENTION_LR_SCALE,
    itm_segment_negatives: float = ITM_SEGMENT_NEGATIVES,
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16."),
    deepspeed: str = typer.Option(None, "--deepspeed", help="A DeepSpeed preset or JSON file."),
    workers: int = typer.Option(2, "--workers", min=0),
    no_augment: bool = typer.Option(False, "--no-augment"),
    save_every: int = typer.Option(1000, "--save-every", min=0),
    log_every: int = typer.Option(10, "--log-every", min=1),
    seed: int = typer.Option(42, "--seed"),
) -> None:
    """Screen, filter and rewrite noisy caption segments with the model itself (SCIO)."""
    from sarkit.records import load_all
    from sarkit.scio.options import ScioOptions

    if precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"--precision {precision}: use fp32, bf16 or fp16")
    to_stdout = output == "-"
    if to_stdout and run_dir is None:
        raise UsageError("-o -: give the run folder with --run-dir")
    if not to_stdout and run_dir is not None:
        raise UsageError("--run-dir goes with -o - only (-o names the run folder)")
    folder = run_dir if to_stdout else Path(output)
    if ablation and heldout is None:
        raise UsageError("--ablation needs --heldout CLEAN.jsonl (clean held-out pairs)")
    if heldout is not None and not ablation:
        raise UsageError("--heldout goes with --ablation")
    if screen_only and ablation:
        raise UsageError("--screen-only and --ablation exclude each other")
    from sarkit.scio.screen import RULES

    rules = tuple(dict.fromkeys(r.strip().lower() for r in rule.split(",") if r.strip()))
    unknown = [r for r in rules if r not in RULES]
    if unknown or not rules:
        raise UsageError(f"--rule {rule}: use a comma list of {', '.join(RULES)}")
    if ablation_vqa is not None and not ablation:
        raise UsageError("--ablation-vqa goes with --ablation")
    check_output_folder(folder)
    options = ScioOptions(
        output=folder,
        records_path=str(records),
        init=init,
        epochs=epochs_per_stage or 12,
        epochs_per_stage_given=epochs_per_stage is not None,
        max_steps=max_steps,
        rounds=rounds,
        itc_margin=itc_margin,
        itm_margin=itm_margin,
        itc_alone_margin=itc_alone_margin,
        rules=rules,
        segment_z=segment_z,
        field_cap=field_cap,
        screen_batch=screen_batch,
        max_new_tokens=max_new_tokens,
        screen_only=screen_only,
        ablation=ablation,
        heldout_path=str(heldout) if heldout else None,
        ablation_vqa=str(ablation_vqa) if ablation_vqa else None,
        ablation_vqa_epochs=ablation_vqa_epochs,
        ablation_vqa_lr=ablation_vqa_lr,
        vision=vision,
        text=text,
        text_layers=text_layers,
        image_size=image_size,
        center_crop=center_crop,
        embed_dim=embed_dim,
        max_tokens=max_tokens,
        queue_size=queue_size,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup_steps=warmup_steps,
        text_lr_scale=text_lr_scale,
        itm_segment_negatives=itm_segment_negatives,
        cross_attention_lr_scale=cross_attention_lr_scale,
        momentum=momentum,
        precision=precision,
        deepspeed=deepspeed,
        workers=workers,
        augment=not no_augment,
        save_every=save_every,
        log_every=log_every,
        seed=seed,
    )
    check_deepspeed(deepspeed)
    data = load_all(records, required=("id", "path"))
    for flag, path in (("--heldout", heldout), ("--ablation-vqa", ablation_vqa)):
        if path is not None and not path.is_file():
            raise SarkitError(f"{flag} {path}: no such file")
    with contextlib.redirect_stdout(sys.stderr):
        run = plugins.get_manager().hook.sarkit_scio(records=data, options=options)
    if run is None:
        raise UsageError("no plugin implements scio")
    result = Path(run) / ("screened.jsonl" if screen_only else "refined.jsonl")
    if screen_only or to_stdout:
        from sarkit.launch import launch_rank

        # under torchrun rank 0 alone writes the stream (the others' file may be a rerun's old one)
        if result.exists() and launch_rank() == 0:
            with open(result, encoding="utf-8") as fh:
                shutil.copyfileobj(fh, sys.stdout)
            sys.stdout.flush()
    log.info(f"scio: {len(data)} records -> {result}")
