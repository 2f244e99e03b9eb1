"""Built-in `sarkit_pretrain`: the SAR-KnowLIP trainer (plain PyTorch or DeepSpeed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sarkit.plugins import hookimpl


@hookimpl(trylast=True)
def sarkit_pretrain(records: list[dict], options: Any) -> Path | None:
    from sarkit.train.pretrain import pretrain

    return pretrain(records, options)
