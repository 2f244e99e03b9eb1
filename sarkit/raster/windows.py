"""Spatial Resolution Consistency: windows that cover the same ground whatever the pixel size.

Every scale is a regular grid over the scene in its own window size (ground size / pixel
size per axis), anchored at pixel (0, 0), so tiles of one scale never overlap and their ids
are grid indices. A tile's parent is the tile of the next larger scale that contains its
centre; with ground sizes that divide each other (4000, 1000, 250) every child lies wholly
inside its parent. Tiles come out depth-first (a parent, then its children), which is the
order the caption stage's large -> medium -> small chain needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SCALE_NAMES = ("L", "M", "S", "XS", "XXS")


@dataclass(frozen=True)
class TileSpec:
    level: int
    scale: str
    row: int
    col: int
    col_off: int
    row_off: int
    width: int
    height: int
    coverage: float  # fraction of the window inside the scene
    parent: int | None  # index into the plan of the containing larger tile

    @property
    def window(self) -> list[int]:
        return [self.col_off, self.row_off, self.width, self.height]

    def inside(self, scene_w: int, scene_h: int) -> tuple[int, int, int, int]:
        """The part of the window inside the scene: (col, row, width, height)."""
        c0, r0 = max(self.col_off, 0), max(self.row_off, 0)
        c1 = min(self.col_off + self.width, scene_w)
        r1 = min(self.row_off + self.height, scene_h)
        return c0, r0, max(c1 - c0, 0), max(r1 - r0, 0)


def window_size(ground_m: float, pixel_m: float) -> int:
    return int(round(ground_m / pixel_m))


def scale_names(n: int) -> tuple[str, ...]:
    if n > len(SCALE_NAMES):
        raise ValueError(f"at most {len(SCALE_NAMES)} ground sizes, got {n}")
    return SCALE_NAMES[:n]


def plan(
    scene_w: int,
    scene_h: int,
    sizes: Sequence[tuple[int, int]],
    keep_partial: bool = False,
    min_coverage: float = 1.0,
) -> tuple[list[TileSpec], int]:
    """All tiles of all scales, depth-first. Returns (tiles, number of partial tiles dropped).

    `sizes` are (width, height) in pixels from large to small. A partial tile (reaching past
    the scene's right or bottom edge) is kept only with `keep_partial` and at least
    `min_coverage` of its area inside the scene.
    """
    names = scale_names(len(sizes))
    tiles: list[TileSpec] = []
    dropped = 0

    def cells(lo: int, hi: int, step: int, top: bool) -> range:
        if top:  # every cell that overlaps the scene
            return range(0, math.ceil(hi / step))
        # cells whose centre lies in [lo, hi)
        return range(max(math.ceil((lo - step / 2) / step), 0), math.ceil((hi - step / 2) / step))

    def visit(level: int, c_lo: int, r_lo: int, c_hi: int, r_hi: int, parent: int | None):
        nonlocal dropped
        w, h = sizes[level]
        for row in cells(r_lo, r_hi, h, parent is None):
            for col in cells(c_lo, c_hi, w, parent is None):
                inside_w = min(col * w + w, scene_w) - col * w
                inside_h = min(row * h + h, scene_h) - row * h
                coverage = max(inside_w, 0) * max(inside_h, 0) / float(w * h)
                if coverage < 1.0 and (not keep_partial or coverage < min_coverage):
                    dropped += 1
                    continue
                spec = TileSpec(
                    level, names[level], row, col, col * w, row * h, w, h, coverage, parent
                )
                tiles.append(spec)
                if level + 1 < len(sizes):
                    index = len(tiles) - 1
                    visit(level + 1, col * w, row * h, col * w + w, row * h + h, index)

    visit(0, 0, 0, scene_w, scene_h, None)
    return tiles, dropped
