"""Tiny GeoTIFFs the tests make themselves for edge cases (torchgeo's habit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.control import GroundControlPoint

UTM_SHANGHAI = ("EPSG:32651", Affine(2.0, 0, 350000, 0, -2.0, 3460000))


def write(
    path: Path,
    data: np.ndarray,
    crs=UTM_SHANGHAI[0],
    transform=UTM_SHANGHAI[1],
    nodata=None,
    gcps=None,
    descriptions=None,
    tags=None,
) -> Path:
    data = data if data.ndim == 3 else data[None]
    profile = dict(
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
    )
    if gcps is None and crs is not None:
        profile.update(crs=crs, transform=transform)
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        if gcps is not None:
            ds.gcps = (gcps, rasterio.crs.CRS.from_epsg(4326))
        for i, desc in enumerate(descriptions or [], start=1):
            ds.set_band_description(i, desc)
        if tags:
            ds.update_tags(**tags)
    return path


def speckle(shape, seed=0, dtype=np.float32, scale=1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.sqrt(rng.exponential(scale, size=shape))).astype(dtype)


def gcps_for(width: int, height: int, lon0=121.0, lat0=31.0, step=1e-4):
    """Four corner GCPs of a slightly rotated grid in WGS84."""
    pts = [(0, 0), (0, width), (height, 0), (height, width)]
    return [
        GroundControlPoint(
            row=r, col=c, x=lon0 + c * step + r * step * 0.1, y=lat0 - r * step + c * step * 0.1
        )
        for r, c in pts
    ]
