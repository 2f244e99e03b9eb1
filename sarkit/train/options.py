"""Options of the shared training loop, and of `sarkit pretrain` on top of them (the
defaults of the paper, section 4.1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LoopOptions:
    """What the loop needs; stage options (PretrainOptions, fine-tune options) carry these."""

    output: Path
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    lr_start: float = 1e-6
    lr_min: float = 1e-6
    warmup_steps: int = 0
    lr_decay: float = 0.9
    schedule: str = "step"
    weight_decay: float = 0.05
    precision: str = "fp32"
    deepspeed: str | None = None
    workers: int = 2
    save_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0: at the end of each epoch (when the task evaluates)
    resume: str | None = None
    seed: int = 42
    name: str = "train"

    @classmethod
    def of(cls, options: Any, **overrides: Any) -> LoopOptions:
        """The loop's share of a stage's options object (fields of the same name)."""
        from dataclasses import fields

        values = {f.name: getattr(options, f.name) for f in fields(cls) if hasattr(options, f.name)}
        values.update(overrides)
        return cls(**values)


@dataclass
class PretrainOptions(LoopOptions):
    """The loop's options plus the model's; a plugin reads the fields it knows."""

    records_path: str | None = None
    val_path: str | None = None  # held-out records: retrieval R@K every eval pass
    # model
    vision: str = "vit_base_patch16_224"
    vision_weights: str | None = None
    vision_args: dict = field(default_factory=dict)  # timm kwargs (--vision-args)
    init: str | None = None  # a run or checkpoint folder to start from (new schedule)
    image_size: int = 224
    center_crop: float = 1.0  # keep this side fraction of every tile (MSTAR chips: 88/128)
    text: str | None = None
    text_layers: int | None = None
    embed_dim: int = 256
    max_tokens: int = 256
    fields: tuple[str, ...] | None = None
    queue_size: int = 20000
    momentum: float = 0.995
    alpha: float = 0.4
    alpha_rampup_steps: int | None = None  # None: the first epoch (as ALBEF)
    temp: float = 0.07
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    drop_path: float = 0.0
    pool: str = "mean"  # ITC features: "mean" or "cls"
    decoder_loss: str = "both"  # mlm | lm | both (see KnowLIPConfig)
    # share of ITM negatives that are the image's own text with one segment swapped
    # (KnowLIPConfig.itm_segment_negatives); None: the --init run's, or the default
    itm_segment_negatives: float | None = None
    # the paper's schedule over the loop's defaults
    epochs: int = 12
    warmup_steps: int = 3000
    name: str = "pretrain"
    text_lr_scale: float = 1.0  # lr factor for the pretrained text tower and decoder
    # lr factor of their cross-attention layers (new weights); None: text_lr_scale's
    cross_attention_lr_scale: float | None = None
    grad_checkpointing: bool = False
    # data and bookkeeping
    augment: bool = True
    strict: bool = False  # failed/dropped/empty records are an error, not skipped
    extra: dict = field(default_factory=dict)
