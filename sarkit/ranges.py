"""Numeric command-line options checked when they are parsed: exit 2 with the allowed range.

click's FloatRange lets NaN through (every comparison with NaN is false) and has no open
bounds in typer's Option; `number_in` gives a parser that rejects NaN, infinities and
values outside the range, naming the range, before any work starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import typer


def range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    """The range in click's notation: 0<=x<=1, x>0."""
    left = f"{lo:g}{'<' if lo_open else '<='}" if lo is not None else ""
    right = f"{'<' if hi_open else '<='}{hi:g}" if hi is not None else ""
    if lo is not None and hi is None:
        return f"x{'>' if lo_open else '>='}{lo:g}"
    return f"{left}x{right}"


def number_in(
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Callable[[object], float]:
    """A typer `parser` for a finite float within [lo, hi] (open ends where asked)."""
    allowed = range_text(lo, hi, lo_open, hi_open)

    def parse(value: object) -> float:
        try:
            x = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise typer.BadParameter(f"'{value}' is not a number ({allowed})") from None
        below = lo is not None and (x <= lo if lo_open else x < lo)
        above = hi is not None and (x >= hi if hi_open else x > hi)
        if not math.isfinite(x) or below or above:
            raise typer.BadParameter(f"{value} is not in the range {allowed}")
        return x

    parse.__name__ = "FLOAT"
    return parse


POSITIVE = number_in(0, lo_open=True)
NON_NEGATIVE = number_in(0)
FRACTION = number_in(0, 1)
