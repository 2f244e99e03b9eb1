"""Per-tile features: grey-level statistics and GLCM texture on a fixed working grid.

Tiles of different pixel sizes must compare, so every tile is reduced by an integer block
mean to about ``working_size`` cells a side (integer blocks keep independent speckle
independent: a fractional resampler would smear it into false spatial correlation). Tiles
smaller than the working size are used as they are, never upsampled (duplicated pixels
would look like texture). Pixel value 0 is nodata; valid pixels are 1..255.

Nodata is a *region*, not a pixel count: 8-bit SAR products such as the Umbra GEC clip
have a quarter of their pixels at 0 scattered through dark speckle. A working cell counts
as nodata when at least ``NODATA_CELL`` of its pixels are 0 and at least 7 of its 3x3
neighbourhood (itself included) are such cells; isolated dark pixels never do.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from sarkit.raster.tileread import TileReadError, read_u8

#: Bump when a feature's definition changes: records measured under another version are
#: measured again instead of reused (see ``sarkit.quality.screen.reusable``).
FEATURES_VERSION = "2"  # 2: pixels from sarkit.raster.tileread
#: Defaults for the feature step; change them and every tile must be measured again.
WORKING_SIZE = 256
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 2, 4)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
NODATA_CELL = 0.9
#: Robust z-score above which a working cell counts as a bright scatterer (ships, buildings).
BRIGHT_Z = 6.0
#: Gradient (in working-grid DN per cell) above which a cell is an edge; see `_edges`.
EDGE_Z = 3.0
#: Reference values of the three structure cues (see `structure_score`).
#: Bright scatterers count in cells, not as a fraction: one ship is content whatever the tile
#: size (the working grid is ~256 cells a side for every tile, so counts compare).
STRUCTURE_REF = {"glcm_correlation_d1": 0.05, "edge_density": 0.001, "bright_cells": 12.0}
#: Smallest DN span stretched over the GLCM levels (see `quantise_levels`).
MIN_SPAN = 32.0
PERCENTILES = (1.0, 25.0, 50.0, 75.0, 99.0)


@dataclass(frozen=True)
class Tile:
    """A tile's pixels as the filters see them.

    ``pixels``: the native uint8 array (0 = nodata). ``grid``: float32 block means of the
    valid pixels on the working grid (NaN where a cell has no valid pixel). ``nodata``:
    boolean nodata-region mask on the working grid. ``ok``: cells with data outside the
    nodata region. ``percentiles``: the 1st, 25th, 50th, 75th and 99th percentile of the
    grid over ``ok`` (computed once, shared by the features). ``block``: the reduction factor.
    """

    path: str
    pixels: np.ndarray
    grid: np.ndarray
    nodata: np.ndarray
    ok: np.ndarray
    percentiles: tuple[float, ...]
    block: int


def read_pixels(path: str | os.PathLike) -> np.ndarray:
    """The tile as a 2-D uint8 array with 0 = nodata, read by the shared reader
    (`sarkit.raster.tileread.read_u8`), so the filter measures the pixels the LLM and the
    model see."""
    return read_u8(path)


def _block_sums(a: np.ndarray, f: int) -> np.ndarray:
    """Sums over f x f blocks (remainder rows/columns cropped), by strided accumulation.

    Adding f*f strided views is an order of magnitude faster than a reshape-and-sum over
    non-contiguous axes for the small factors used here.
    """
    h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    if f == 1:
        return a[:h, :w].astype(np.float32)
    b = a[:h, :w]
    acc = np.zeros((h // f, w // f), np.uint16 if f * f * 255 < 65536 else np.uint32)
    for i in range(f):
        for j in range(f):
            acc += b[i::f, j::f]
    return acc.astype(np.float32)


def load_tile(path: str | os.PathLike, working_size: int = WORKING_SIZE) -> Tile:
    """Read a tile and reduce it to the working grid."""
    pixels = read_pixels(path)
    if pixels.ndim != 2 or min(pixels.shape) < 8:
        raise TileReadError(f"{path}: tile too small ({pixels.shape}, need >= 8x8)")
    f = max(1, round(min(pixels.shape) / working_size))
    valid = pixels > 0
    counts = _block_sums(valid.view(np.uint8), f)  # bool -> 0/1 without a copy
    sums = _block_sums(pixels, f)
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)
    empty_cell = counts <= (1.0 - NODATA_CELL) * f * f
    nodata = _region(empty_cell)
    ok = ~nodata & (counts > 0)
    pct = _percentiles(grid[ok]) if ok.any() else ()
    return Tile(str(path), pixels, grid, nodata, ok, pct, f)


def _percentiles(values: np.ndarray) -> tuple[float, ...]:
    """PERCENTILES of grid values to 1/8 DN, from a histogram (a sort costs 10x more)."""
    bins = np.bincount((values * 8.0).astype(np.int32), minlength=8 * 256)
    cdf = np.cumsum(bins) / values.size
    idx = np.searchsorted(cdf, np.asarray(PERCENTILES) / 100.0)
    return tuple(float(i) / 8.0 for i in idx)


def _region(cells: np.ndarray) -> np.ndarray:
    """Cells that are empty and have at least 7 empty cells in their 3x3 neighbourhood.

    The tile edge counts as empty, so a nodata band along the border is measured in full.
    """
    padded = np.pad(cells, 1, constant_values=True)
    return cells & (_neighbours(padded)[1:-1, 1:-1] >= 7)


def _histogram_stats(pixels: np.ndarray) -> dict[str, float]:
    hist = np.bincount(pixels.ravel(), minlength=256)[1:].astype(np.float64)
    n = hist.sum()
    out = {"valid_px": float(n)}
    if n == 0:
        return out | dict.fromkeys(
            ("mean", "std", "cv", "enl", "entropy", "dynamic_range", "saturated_frac"), 0.0
        )
    levels = np.arange(1, 256, dtype=np.float64)
    p = hist / n
    mean = float(p @ levels)
    var = float(p @ (levels - mean) ** 2)
    std = math.sqrt(max(var, 0.0))
    nz = p[p > 0]
    cdf = np.cumsum(p)
    lo = int(np.searchsorted(cdf, 0.01)) + 1
    hi = int(np.searchsorted(cdf, 0.99)) + 1
    return out | {
        "mean": mean,
        "std": std,
        "cv": std / mean,
        "enl": mean * mean / var if var > 0 else 1e6,
        "entropy": float(-(nz * np.log2(nz)).sum()),
        "dynamic_range": float(hi - lo),
        "saturated_frac": float(hist[-1] / n),
    }


def _grid_stats(tile: Tile) -> dict[str, float]:
    g, ok = tile.grid, tile.ok
    n = int(ok.sum())
    if n < 16:
        return {"bright_frac": 0.0, "bright_cells": 0.0, "edge_density": 0.0}
    _, p25, med, p75, _ = tile.percentiles
    scale = max((p75 - p25) / 1.349, 0.5)  # robust sigma from the interquartile range
    bright = ok & (np.nan_to_num(g, nan=0.0) > med + BRIGHT_Z * scale)
    # a scatterer (ship, building) spans cells; a lone bright cell is a speckle tail
    clustered = bright & (_neighbours(bright) >= 2)
    return {
        "bright_frac": float(clustered.sum() / n),
        "bright_cells": float(clustered.sum()),
        "edge_density": _edges(g, ok, med, scale),
    }


def _box3(a: np.ndarray, pad_mode: str = "constant") -> np.ndarray:
    """3x3 neighbourhood sums (separable: two passes of three shifted adds)."""
    p = np.pad(a, 1, mode=pad_mode)
    rows = p[:-2] + p[1:-1] + p[2:]
    return rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """Count of set cells in each 3x3 neighbourhood, the cell itself included."""
    return _box3(mask.view(np.uint8))


def _edges(g: np.ndarray, ok: np.ndarray, fill: float, scale: float) -> float:
    """Fraction of valid cells where a 3x3-smoothed gradient stands out of the noise.

    Smoothing first averages independent speckle down by 3; a central-difference step that
    still exceeds ``EDGE_Z`` times the cell-level spread over 3 is a real edge (a shore, a
    wall, a ridge), not noise.
    """
    if min(g.shape) < 5:
        return 0.0
    s = _box3(np.where(ok, g, np.float32(fill)), "edge")  # 9 x the 3x3 mean
    gy = s[2:, 1:-1] - s[:-2, 1:-1]  # 18 x the central difference
    gx = s[1:-1, 2:] - s[1:-1, :-2]
    limit = np.float32(18.0 * EDGE_Z * scale / 3.0)
    strong = gx * gx + gy * gy > limit * limit
    inner = ok[2:-2, 2:-2]
    n = int(inner.sum())
    return float(np.count_nonzero(strong[1:-1, 1:-1] & inner) / n) if n else 0.0


def quantise_levels(tile: Tile, levels: int = GLCM_LEVELS) -> np.ndarray:
    """Working grid -> GLCM levels 1..levels-1 with 0 reserved for nodata cells.

    The tile's 1st..99th percentile is stretched over the levels, but never a span of less
    than ``MIN_SPAN`` DN: a dark scene (HRSID sea, DN 5..50) still gets its levels, while a
    flat tile stays flat instead of having its noise stretched into texture.
    """
    g, ok = tile.grid, tile.ok
    q = np.zeros(g.shape, np.uint8)
    if not ok.any():
        return q
    lo, hi = tile.percentiles[0], tile.percentiles[-1]
    span = max(float(hi - lo), MIN_SPAN)
    top = levels - 2
    scaled = np.clip((g[ok] - lo) * (top / span), 0, top)
    q[ok] = 1 + scaled.astype(np.uint8)
    return q


def glcm_features(
    tile: Tile, levels: int = GLCM_LEVELS, distances: tuple[int, ...] = GLCM_DISTANCES
) -> dict[str, float]:
    """GLCM properties at each distance, averaged over 4 angles; pairs with nodata excluded.

    Level 0 marks nodata cells; dropping the matrix's row and column 0 before the
    properties are computed leaves only valid-valid pairs.
    """
    from skimage.feature import graycomatrix, graycoprops

    q = quantise_levels(tile, levels)
    angles = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
    glcm = graycomatrix(q, distances, angles, levels=levels)[1:, 1:]
    empty = glcm.sum(axis=(0, 1)) == 0  # (distances, angles) without a single valid pair
    flat = np.count_nonzero(glcm.reshape(-1, *glcm.shape[2:]), axis=0) <= 1
    out: dict[str, float] = {}
    for prop in GLCM_PROPS:
        with np.errstate(invalid="ignore", divide="ignore"):
            values = graycoprops(glcm, prop).astype(np.float64)
        if prop == "correlation":
            # scikit-image calls a flat tile's correlation 1; here no variance means no
            # spatial correlation, so a flat tile cannot pass as textured
            values = np.where(flat, 0.0, values)
        values = np.where(empty, np.nan, np.nan_to_num(values, nan=0.0))
        for di, d in enumerate(distances):
            row = values[di][~empty[di]]
            out[f"glcm_{prop.lower()}_d{d}"] = float(row.mean()) if row.size else 0.0
    return out


def structure_score(feats: dict[str, float]) -> float:
    """Semantic density in one number: 1.0 is the threshold between poor and rich.

    A tile has content if its texture is spatially correlated (terrain, fields, urban
    blocks: independent speckle has GLCM correlation ~0), if it has edges standing out of
    the noise (shores, roads, walls), or if it holds compact bright scatterers (ships,
    buildings, vehicles). Each is scaled by its reference value and the strongest counts.
    """
    return max(
        feats.get("glcm_correlation_d1", 0.0) / STRUCTURE_REF["glcm_correlation_d1"],
        feats.get("edge_density", 0.0) / STRUCTURE_REF["edge_density"],
        feats.get("bright_cells", 0.0) / STRUCTURE_REF["bright_cells"],
    )


def tile_features(tile: Tile) -> dict[str, float]:
    """Every built-in feature of one tile, as plain floats (JSON-ready)."""
    feats = {"nodata_frac": float(tile.nodata.mean())}
    feats |= _histogram_stats(tile.pixels)
    feats |= _grid_stats(tile)
    feats |= glcm_features(tile)
    feats["structure"] = structure_score(feats)
    return feats
