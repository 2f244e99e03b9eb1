"""Options of `sarkit finetune TASK` and `sarkit eval TASK` (no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sarkit.train.options import LoopOptions


@dataclass
class FinetuneOptions(LoopOptions):
    """The loop's options, the backbone's, the data's; a head's own are in ``extra``."""

    task: str = ""
    data: str | None = None
    val_data: str | None = None
    init: str = "random"  # RUN folder | timm:NAME | random | weights FILE
    vision: str = "vit_tiny_patch16_224"
    vision_args: dict[str, Any] = field(default_factory=dict)  # timm kwargs (--vision-args)
    image_size: int = 64
    drop_path: float = 0.1
    val_fraction: float = 0.2  # the seeded split when the data gives none (4:1)
    ema: float | None = None  # measure/save a moving average of the weights (--ema DECAY)
    schedule: str = "cosine"
    warmup_steps: int = 100
    name: str = "finetune"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_head(cls, head: Any, **given: Any) -> FinetuneOptions:
        """A head's run: its defaults (the paper's Table 3/5 settings) under the values
        given (None: not given, the default stands)."""
        defaults = dict(getattr(head, "defaults", {}) or {})
        fields = {k: v for k, v in defaults.items() if k in cls.__dataclass_fields__}
        fields.update({k: v for k, v in given.items() if v is not None})
        return cls(task=head.name, name=head.name, **fields)


@dataclass
class EvalOptions:
    """What `sarkit eval TASK RUN` needs; a head's own options are in ``extra``."""

    run: Path
    data: str | None = None
    weights: str = "last"  # last | best
    batch_size: int = 64
    workers: int = 0
    precision: str = "fp32"
    figures: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
