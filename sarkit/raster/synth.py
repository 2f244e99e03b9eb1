"""A synthesised, georeferenced SAR scene, so a fresh machine can run the pipeline with no download.

Fully developed speckle (single-look intensity is exponential around the backscatter
sigma0; amplitude is its square root) over a layout a SAR analyst would recognise: dark sea
with bright ships, a dark smooth runway, bright textured built-up blocks with double-bounce
edges, dark roads, a bright pier, grassland, and a NaN-filled corner outside the swath.
Placed at Shanghai Pudong (airport and coast) in UTM 51N with 1 m pixels, like a Gaofen-3
spotlight product, and tagged as synthetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.warp import transform as warp_transform

from sarkit.atomic import atomic_path

PUDONG = (121.805, 31.150)  # lon, lat: Pudong airport, by the East China Sea
SIGMA0 = {  # linear backscatter, typical C-band values
    "sea": 0.006,
    "grass": 0.08,
    "runway": 0.002,
    "road": 0.01,
    "building": 0.6,
    "corner": 25.0,
    "ship": 40.0,
    "pier": 3.0,
}


def _rotated_rect(xx, yy, cx, cy, length, width, angle):
    c, s = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)


def backscatter_map(size: int, pixel_m: float, rng: np.random.Generator) -> np.ndarray:
    """The noise-free sigma0 layout (what the speckle is drawn around)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) * np.float32(pixel_m)
    extent = size * pixel_m
    # grassland with gentle texture
    sigma = SIGMA0["grass"] * (1 + 0.4 * np.sin(xx / 90.0) * np.cos(yy / 130.0))
    # sea east of a wavy coastline
    coast = 0.64 * extent + 40 * np.sin(yy / 150.0)
    sea = xx > coast
    sigma = np.where(sea, SIGMA0["sea"], sigma)
    # runway and a parallel taxiway, north-south, west of the coast
    runway = _rotated_rect(xx, yy, 0.45 * extent, 0.55 * extent, 0.8 * extent, 60, np.pi / 2)
    taxi = _rotated_rect(xx, yy, 0.38 * extent, 0.55 * extent, 0.7 * extent, 23, np.pi / 2)
    sigma = np.where(runway | taxi, SIGMA0["runway"], sigma)
    # built-up blocks in the north-west: buildings with double-bounce edges, dark streets
    town = (xx < 0.3 * extent) & (yy < 0.45 * extent)
    bx, by = np.mod(xx, 60.0), np.mod(yy, 45.0)
    building = town & (bx > 8) & (bx < 48) & (by > 8) & (by < 36)
    edge = town & building & ((bx < 11) | (by > 33))
    sigma = np.where(town & ~building, SIGMA0["road"], sigma)
    sigma = np.where(building, SIGMA0["building"] * rng.uniform(0.5, 1.5), sigma)
    sigma = np.where(edge, SIGMA0["corner"], sigma)
    # a road from the town to the airport
    road = _rotated_rect(xx, yy, 0.30 * extent, 0.62 * extent, 0.6 * extent, 12, 0.3)
    sigma = np.where(road & ~sea, SIGMA0["road"], sigma)
    # a pier into the sea and ships around it
    pier_y = 0.3 * extent
    pier = (np.abs(yy - pier_y) < 8) & (xx > coast - 10) & (xx < coast + 0.12 * extent)
    sigma = np.where(pier, SIGMA0["pier"], sigma)
    for _ in range(14):
        cx = rng.uniform(0.72, 0.97) * extent
        cy = rng.uniform(0.05, 0.95) * extent
        length = rng.uniform(25, 180)
        ship = _rotated_rect(xx, yy, cx, cy, length, length / 6.5, rng.uniform(0, np.pi))
        sigma = np.where(ship & sea, SIGMA0["ship"], sigma)
    return sigma.astype(np.float32)


def make_scene(
    path: str | Path,
    size: int = 2048,
    pixel_m: float = 1.0,
    center: tuple[float, float] = PUDONG,
    seed: int = 0,
) -> Path:
    """Write the scene as float32 amplitude GeoTIFF (tiled, NaN nodata) and return its path."""
    rng = np.random.default_rng(seed)
    sigma = backscatter_map(size, pixel_m, rng)
    intensity = sigma * rng.exponential(1.0, size=sigma.shape).astype(np.float32)
    amplitude = np.sqrt(intensity, dtype=np.float32)
    corner = np.add.outer(np.arange(size), np.arange(size)) < size * 0.35  # outside the swath
    amplitude[corner] = np.nan
    crs = "EPSG:32651"
    (x,), (y,) = warp_transform("EPSG:4326", crs, [center[0]], [center[1]])
    half = size * pixel_m / 2
    transform = Affine(pixel_m, 0, x - half, 0, -pixel_m, y + half)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        count=1,
        dtype="float32",
        crs=crs,
        transform=transform,
        nodata=float("nan"),
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
    )
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as ds:
        ds.write(amplitude, 1)
        ds.set_band_description(1, "HH")
        ds.update_tags(
            SATELLITE="GF3 (synthetic)",
            SARKIT_SYNTHETIC="1",
            DESCRIPTION="sarkit synthetic SAR scene: sea, ships, runway, built-up blocks",
        )
    return path
