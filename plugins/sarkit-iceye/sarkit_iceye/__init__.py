"""ICEYE sensor profile: recognised by file name (ICEYE_...) or by metadata naming ICEYE."""

from __future__ import annotations

from sarkit.plugins import hookimpl
from sarkit.sensors import SensorProfile

ICEYE = SensorProfile(
    name="iceye",
    platform="ICEYE",
    band="X",
    pixel_m=0.5,
    polarizations=("VV",),
    radiometry="amplitude",
    # product names look like ICEYE_X7_GRD_SLH_52797_20210127T205305.tif
    name_patterns=(r"^ICEYE_", r"(^|[_-])ICEYE[_-]X\d+"),
    metadata_patterns={
        "TIFFTAG_IMAGEDESCRIPTION": r"ICEYE",
        "TIFFTAG_SOFTWARE": r"ICEYE",
        "SATELLITE": r"ICEYE|^X\d+$",
    },
    description="ICEYE X-band microsatellite SAR (spot ~0.5 m, strip ~3 m), VV",
)


@hookimpl
def sarkit_sensors() -> list[SensorProfile]:
    return [ICEYE]
