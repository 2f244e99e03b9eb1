"""Quality filters: the plugin interface and the built-in hard rules.

A filter looks at one tile at a time, in a worker process: ``measure`` may add features
from the pixels (a CLIP-similarity filter would add its similarity here), ``verdict`` reads
the tile's features and says ``FAIL`` (drop, with the filter's name as the reason),
``PASS`` (clearly fine: a keep seed for the kNN) or ``UNSURE`` (fine by this rule, but
close to its threshold: the kNN decides). Register filters with the
``sarkit_quality_filters`` hook; instances must be picklable (module-level classes).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from sarkit.quality import FilterOptions

FAIL = "fail"
PASS = "pass"
UNSURE = "unsure"


class QualityFilter(abc.ABC):
    """Base class for a tile filter; ``name`` is also the drop reason it reports.

    ``knn_features`` names the features this filter adds that the kNN should use too.
    ``drop_seeds``: whether the tiles this filter fails show the kNN what bad *content*
    looks like. A tile mostly outside its scene does not (its valid part may be fine), so
    the nodata rule sets it False.
    """

    name: str
    description: str
    knn_features: tuple[str, ...] = ()
    drop_seeds: bool = True
    #: The quality keys ``verdict`` reads. None: unknown, so the tile is always measured
    #: afresh; a tuple lets a rerun reuse features a ``--mark`` output already carries.
    needs: tuple[str, ...] | None = None

    def measure(self, tile: Any) -> dict[str, float]:
        """Extra features from the pixels (``sarkit.quality.features.Tile``); none by default."""
        return {}

    @abc.abstractmethod
    def verdict(self, quality: dict[str, Any], options: FilterOptions) -> str:
        """FAIL, PASS or UNSURE for a tile with these features (every filter must say)."""


@dataclass(frozen=True)
class Threshold(QualityFilter):
    """A rule on one feature: fail beyond the threshold, clear pass `margin` times inside."""

    name: str
    feature: str
    option: str  # the FilterOptions field holding the threshold
    upper: bool  # True: values above the threshold fail; False: values below fail
    description: str = ""
    drop_seeds: bool = True

    @property
    def needs(self) -> tuple[str, ...]:
        return (self.feature,)

    def verdict(self, quality: dict[str, Any], options: FilterOptions) -> str:
        value = float(quality.get(self.feature, 0.0))
        limit = float(getattr(options, self.option))
        if self.upper:
            if value > limit:
                return FAIL
            return PASS if value * options.margin <= limit else UNSURE
        if value < limit:
            return FAIL
        return PASS if value >= limit * options.margin else UNSURE


BUILTIN_FILTERS = (
    Threshold(
        "nodata",
        "nodata_frac",
        "max_nodata",
        upper=True,
        description="more than --max-nodata of the tile is a nodata (0) region",
        drop_seeds=False,
    ),
    Threshold(
        "constant",
        "std",
        "min_std",
        upper=False,
        description="grey-level standard deviation below --min-std DN: a flat tile",
    ),
    Threshold(
        "saturated",
        "saturated_frac",
        "max_saturated",
        upper=True,
        description="more than --max-saturated of valid pixels at 255",
    ),
    Threshold(
        "structure-poor",
        "structure",
        "min_structure",
        upper=False,
        description="region screening: no correlated texture, edges or bright scatterers "
        "(open water, bare plains, pure speckle); disable for marine datasets",
    ),
)
