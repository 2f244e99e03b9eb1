"""Built-in sensor profiles, registered as a plugin like any third-party sensor."""

from __future__ import annotations

from sarkit.plugins import hookimpl
from sarkit.sensors import SensorProfile

PROFILES = [
    SensorProfile(
        name="gaofen3",
        platform="Gaofen-3",
        band="C",
        pixel_m=1.0,
        polarizations=("HH", "HV", "VH", "VV"),
        name_patterns=(r"(^|[_-])GF-?3[A-C]?[_-]", r"gaofen-?3"),
        metadata_patterns={"SATELLITE": r"GF-?3|Gaofen-?3", "TIFFTAG_IMAGEDESCRIPTION": r"GF-?3"},
        description="Gaofen-3 C-band SAR; 1 m spotlight products in SAR-GEOVL-1M",
    ),
    SensorProfile(
        name="hongtu1",
        platform="Hongtu-1",
        band="X",
        pixel_m=3.0,
        polarizations=("HH", "VV"),
        name_patterns=(r"(^|[_-])HT-?1", r"hongtu-?1", r"piesat"),
        metadata_patterns={"SATELLITE": r"HT-?1|Hongtu"},
        description="Hongtu-1 (PIESAT-1) X-band constellation; 3 m strip products",
    ),
    SensorProfile(
        name="qilu1",
        platform="Qilu-1",
        band="Ku",
        pixel_m=0.2,
        polarizations=("VV",),
        name_patterns=(r"(^|[_-])QL-?1", r"qilu-?1"),
        metadata_patterns={"SATELLITE": r"QL-?1|Qilu"},
        description="Qilu-1 Ku-band SAR; 0.2 m, the finest resolution in SAR-GEOVL-1M",
    ),
    SensorProfile(
        name="sentinel1",
        platform="Sentinel-1",
        band="C",
        pixel_m=10.0,
        polarizations=("VV", "VH", "HH", "HV"),
        radiometry="power",
        name_patterns=(r"(^|[_-])S1[ABCD]_", r"RTC-S1", r"sentinel-?1"),
        metadata_patterns={"MISSION": r"S1|Sentinel-?1", "PLATFORM": r"Sentinel-?1"},
        description="Sentinel-1 C-band (GRD 10 m, OPERA RTC 30 m; linear power)",
    ),
    SensorProfile(
        name="umbra",
        platform="Umbra",
        band="X",
        pixel_m=0.5,
        polarizations=("VV", "HH"),
        name_patterns=(r"umbra",),
        metadata_patterns={"TIFFTAG_IMAGEDESCRIPTION": r"umbra", "PLATFORM": r"umbra"},
        description="Umbra X-band spotlight (GEC amplitude products)",
    ),
    SensorProfile(
        name="generic",
        platform="unknown",
        band="unknown",
        pixel_m=None,
        description="Any SAR raster: resolution from its transform, nothing assumed",
    ),
]


@hookimpl
def sarkit_sensors() -> list[SensorProfile]:
    return PROFILES
