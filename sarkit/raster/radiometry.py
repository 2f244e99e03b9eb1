"""Which radiometry a scene's pixels are in (amplitude, power or dB), decided from its data.

A sensor profile only says what a platform usually ships: a Sentinel-1 GRD is power, but the
same product geocoded by SNAP or pyroSAR is often written in dB (``..._db.tif``). Taken as
power, dB values (all negative) become amplitude 0 and every tile one constant grey. Power
and amplitude are never negative, so the scene's fitted sample settles it; the band's unit,
the metadata and the file name come before the profile's default.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sarkit.errors import SarkitError

#: share of the sampled values below zero from which a scene is in dB (power and amplitude
#: are never negative; a few negative values are resampling ringing, not dB)
NEGATIVE_DB = 0.10
#: |dB| above this is no backscatter (-60 dB to +60 dB spans anything a radar measures)
MAX_ABS_DB = 100.0
_DB_NAME = re.compile(r"(?<![a-z0-9])db(?![a-z0-9])")
_DB_UNIT = re.compile(r"^\s*(db|decibels?)\s*$", re.IGNORECASE)
_LINEAR_UNIT = {"amplitude": ("amplitude",), "power": ("power", "intensity", "linear power")}


def _unit_says(units: list[str]) -> str | None:
    for unit in units:
        if _DB_UNIT.match(unit or ""):
            return "db"
        for kind, words in _LINEAR_UNIT.items():
            if (unit or "").strip().lower() in words:
                return kind
    return None


def _negative_share(sample: np.ndarray) -> float:
    if sample.size == 0 or np.iscomplexobj(sample):
        return 0.0
    finite = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
    return float(np.count_nonzero(finite < 0)) / max(finite.size, 1)


def decide(
    declared: str,
    path: Path,
    dtype: str,
    units: list[str],
    profile_name: str,
    profile_radiometry: str,
    sample: np.ndarray,
) -> tuple[str, str]:
    """(radiometry, why) for a scene; a declared radiometry the data contradicts is an error.

    `units` are the band's unit and any unit-like metadata values; `sample` the raw valid
    pixels the quantiser is fitted on."""
    negative = _negative_share(sample)
    neg_text = f"{100 * negative:.0f}% of the sampled values are negative"
    if declared != "auto":
        if declared in ("amplitude", "power") and negative >= NEGATIVE_DB:
            raise SarkitError(
                f"{path}: --radiometry {declared}, but {neg_text} (power and amplitude never "
                "are): the scene looks like dB; pass --radiometry db (or auto)"
            )
        if declared == "db" and sample.size and not np.iscomplexobj(sample):
            finite = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
            high = float(np.count_nonzero(np.abs(finite) > MAX_ABS_DB)) / max(finite.size, 1)
            if high > 0.01:
                raise SarkitError(
                    f"{path}: --radiometry db, but {100 * high:.0f}% of the sampled values "
                    f"lie beyond +/-{MAX_ABS_DB:g} (no backscatter in dB does): pass "
                    "--radiometry amplitude or power (or auto)"
                )
        return declared, "--radiometry"
    if dtype.startswith("complex"):
        return "amplitude", "complex pixels (magnitude)"
    if dtype == "uint8":
        return "amplitude", "an 8-bit product"
    if negative >= NEGATIVE_DB:
        return "db", f"{neg_text}; power and amplitude never are"
    unit = _unit_says(units)
    if unit is not None:
        return unit, f"the band's unit says {unit}"
    if _DB_NAME.search(Path(path).stem.lower()):
        return "db", "'db' in the file name"
    return profile_radiometry, f"the {profile_name} sensor profile"


def constant_share(levels: np.ndarray) -> float:
    """The share of quantised sample pixels at the most common output level."""
    if levels.size == 0:
        return 0.0
    return float(np.bincount(levels.ravel(), minlength=256).max()) / levels.size
