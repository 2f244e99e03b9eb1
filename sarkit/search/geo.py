"""`--bbox WEST,SOUTH,EAST,NORTH`: keep the tiles whose footprint meets the box.

Footprints are georef's WGS84 rings (convex quadrilaterals, rotated for a rotated scene), so
the test is exact: two convex polygons are disjoint exactly when some edge normal of one
separates them (the separating axis theorem), done for every tile at once in numpy. A box
whose WEST is east of its EAST crosses the antimeridian (RFC 7946 section 5.2).
"""

from __future__ import annotations

import numpy as np

from sarkit.errors import UsageError


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """'W,S,E,N' in degrees, or a usage error naming --bbox and what is wrong."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4:
        raise UsageError(
            f"--bbox {text!r}: give WEST,SOUTH,EAST,NORTH (4 numbers), not {len(parts)} value(s)"
        )
    try:
        w, s, e, n = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--bbox {text!r}: WEST,SOUTH,EAST,NORTH must be numbers") from None
    if not all(np.isfinite([w, s, e, n])):
        raise UsageError(f"--bbox {text!r}: values must be finite")
    if not (-180 <= w <= 180 and -180 <= e <= 180):
        raise UsageError(f"--bbox {text!r}: longitudes must lie in [-180, 180]")
    if not (-90 <= s <= 90 and -90 <= n <= 90):
        raise UsageError(f"--bbox {text!r}: latitudes must lie in [-90, 90]")
    if s > n:
        raise UsageError(f"--bbox {text!r}: SOUTH {s} is north of NORTH {n}")
    return w, s, e, n


def _meets_box(rings: np.ndarray, w: float, s: float, e: float, n: float) -> np.ndarray:
    """(tiles,) bool: ring (tiles, 5, 2) meets the box [w, e] x [s, n] (w <= e)."""
    pts = rings[:, :4]  # the closing point repeats the first
    lon, lat = pts[..., 0], pts[..., 1]
    hit = (lon.min(1) <= e) & (lon.max(1) >= w) & (lat.min(1) <= n) & (lat.max(1) >= s)
    box = np.array([[w, s], [e, s], [e, n], [w, n]])
    edges = np.roll(pts, -1, axis=1) - pts  # (tiles, 4, 2)
    normals = np.stack([-edges[..., 1], edges[..., 0]], axis=-1)
    for j in range(4):
        axis = normals[:, j]  # (tiles, 2)
        p = np.einsum("tkd,td->tk", pts, axis)
        b = box @ axis.T  # (4, tiles)
        apart = (p.max(1) < b.min(0)) | (b.max(0) < p.min(1))
        degenerate = ~np.any(axis != 0, axis=1)  # a repeated corner: no axis to test
        hit &= ~(apart & ~degenerate)
    return hit & np.isfinite(pts).all(axis=(1, 2))


def in_bbox(rings: np.ndarray, bbox: tuple[float, float, float, float]) -> np.ndarray:
    """(tiles,) bool: the tile's footprint meets the box; False for a tile without one."""
    w, s, e, n = bbox
    with np.errstate(invalid="ignore"):
        if w <= e:
            return _meets_box(rings, w, s, e, n)
        return _meets_box(rings, w, s, 180.0, n) | _meets_box(rings, -180.0, s, e, n)
