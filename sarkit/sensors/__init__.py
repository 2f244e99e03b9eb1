"""Sensor profiles: band, nominal resolution, and how to recognise a platform's files."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from sarkit.plugins import collect, lookup

RADIOMETRIES = ("amplitude", "power", "db")


@dataclass(frozen=True)
class SensorProfile:
    """What sarkit needs to know about a SAR platform.

    `name_patterns` are regular expressions searched (case-insensitively) in the file name;
    `metadata_patterns` map a GDAL metadata key to a regex its value must match. Either
    kind of match identifies the platform. `radiometry` says how pixel values relate to
    backscatter when the file does not say (amplitude, power or dB).
    """

    name: str
    platform: str
    band: str
    pixel_m: float | None
    polarizations: tuple[str, ...] = ()
    radiometry: str = "amplitude"
    name_patterns: tuple[str, ...] = ()
    metadata_patterns: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def matches(self, path: Path, tags: dict[str, str]) -> bool:
        stem = Path(path).name
        if any(re.search(p, stem, re.IGNORECASE) for p in self.name_patterns):
            return True
        for key, pattern in self.metadata_patterns.items():
            for tag_key, value in tags.items():
                if tag_key.upper() == key.upper() and re.search(pattern, str(value), re.I):
                    return True
        return False


def registry() -> dict[str, SensorProfile]:
    return collect("sarkit_sensors")


def get(name: str) -> SensorProfile:
    return lookup("sarkit_sensors", name, "sensor")


def detect(path: Path, tags: dict[str, str]) -> SensorProfile:
    """The first profile (third-party before built-in) that recognises the file, else generic."""
    profiles = registry()
    ordered = sorted(profiles.values(), key=lambda p: p.name == "generic")
    for profile in ordered:
        if profile.name != "generic" and profile.matches(path, tags):
            return profile
    return profiles["generic"]


_POL = re.compile(r"(?<![A-Z])(HH|HV|VH|VV)(?![A-Z])")


def polarization_of(path: Path, tags: dict[str, str], band_description: str | None) -> str | None:
    """Polarisation from the band description, a metadata tag, or the file name."""
    candidates = [band_description or ""]
    candidates += [v for k, v in tags.items() if "POLAR" in k.upper()]
    candidates.append(Path(path).stem.upper())
    for text in candidates:
        found = _POL.findall(str(text).upper())
        if found:
            return found[-1]
    return None
