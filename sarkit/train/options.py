"""Options for `sarkit pretrain` (and the defaults of the paper, section 4.1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PretrainOptions:
    """What the trainer needs; a plugin reads the fields it knows and ignores the rest."""

    output: Path
    records_path: str | None = None
    # model
    vision: str = "vit_base_patch16_224"
    vision_weights: str | None = None
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
    # optimisation (paper defaults)
    epochs: int = 12
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 3e-4
    lr_start: float = 1e-6
    lr_min: float = 1e-6
    warmup_steps: int = 3000
    lr_decay: float = 0.9
    schedule: str = "step"  # see sarkit.train.schedule
    grad_accum: int = 1  # micro-batches per optimiser step
    weight_decay: float = 0.05
    text_lr_scale: float = 1.0  # lr factor for the pretrained text tower and decoder
    # engine
    precision: str = "fp32"  # fp32 | bf16 | fp16
    deepspeed: str | None = None  # zero1 | zero2 | zero3 | zero2-offload | zero3-offload | FILE
    grad_checkpointing: bool = False
    # data and bookkeeping
    workers: int = 2
    augment: bool = True
    save_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0
    strict: bool = False  # failed/dropped/empty records are an error, not skipped
    resume: str | None = None  # "latest" or a checkpoint folder
    seed: int = 42
    extra: dict = field(default_factory=dict)
