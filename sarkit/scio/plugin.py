"""Built-in `sarkit_scio`: screen, filter and reconstruct with the model itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sarkit.plugins import hookimpl


@hookimpl(trylast=True)
def sarkit_scio(records: list[dict], options: Any) -> Path | None:
    from sarkit.scio.driver import scio

    return scio(records, options)
