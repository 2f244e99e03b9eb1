"""Tile quality screening: GLCM + statistics features, hard rules, kNN in feature space.

``FilterOptions`` is the options object the ``sarkit_filter`` stage hook receives. This
module stays import-cheap (the plugin manager imports the package at every start).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class FilterOptions:
    """Thresholds and switches of ``sarkit filter``; every default is documented in --help.

    max_nodata: drop a tile when more than this fraction of it is a nodata region.
    min_std: drop a tile whose grey-level standard deviation (DN) is below this (flat).
    max_saturated: drop a tile when more than this fraction of valid pixels is 255.
    min_structure: region screening: drop a tile whose structure score is below this.
    k: neighbours in the kNN vote; min_score: the kNN P(keep) a tile needs.
    margin: a tile passes a rule *clearly* (a kNN keep seed) when it is this factor inside
    the threshold; between the threshold and the margin the kNN decides.
    disabled: filter names (reasons) switched off, e.g. ``structure-poor`` for marine sets.
    seed_labels: CSV of hand labels (id,label) that replace the bootstrapped keep seeds.
    jobs: worker processes for the feature step.
    remeasure: measure every tile even when its record carries features of this version.
    """

    max_nodata: float = 0.5
    min_std: float = 2.0
    max_saturated: float = 0.2
    min_structure: float = 1.0
    k: int = 7
    min_score: float = 0.5
    margin: float = 2.0
    disabled: frozenset[str] = field(default_factory=frozenset)
    seed_labels: Path | None = None
    jobs: int = 1
    working_size: int = 256
    remeasure: bool = False
