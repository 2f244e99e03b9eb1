"""Opening a scene: georeferencing, pixel size in metres, nodata, band choice, scene statistics."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# GDAL's default block cache is 5% of RAM and shows up as every reader's peak RSS;
# tiles are read once, so a small cache costs nothing (FACTS: same speed at 64 MB).
os.environ.setdefault("GDAL_CACHEMAX", "64")

import rasterio  # noqa: E402
from affine import Affine  # noqa: E402
from rasterio.errors import RasterioIOError  # noqa: E402
from rasterio.transform import from_gcps  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from sarkit.errors import SarkitError  # noqa: E402

METRES_PER_DEGREE = 111_320.0


@dataclass
class Scene:
    path: Path
    width: int
    height: int
    count: int
    dtype: str
    crs: str | None
    transform: Affine  # fitted from GCPs for GCP-only rasters
    gcps: list | None
    nodata: float | None  # from the tag (may be NaN)
    tags: dict[str, str]
    descriptions: tuple[str | None, ...]
    pixel_m: tuple[float, float] | None  # metres per column step, per row step

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None


def pixel_size_m(transform: Affine, crs, center_lat: float | None) -> tuple[float, float]:
    """Ground length of one column step and one row step: the lengths of the transform's
    column vectors, so a rotated transform gives the true pixel size. Degrees (a geographic
    CRS) are converted at the scene's latitude."""
    px = math.hypot(transform.a, transform.d)
    py = math.hypot(transform.b, transform.e)
    if crs is not None and crs.is_geographic:
        lat = math.radians(center_lat or 0.0)
        kx = METRES_PER_DEGREE * math.cos(lat)
        px = math.hypot(transform.a * kx, transform.d * METRES_PER_DEGREE)
        py = math.hypot(transform.b * kx, transform.e * METRES_PER_DEGREE)
    elif crs is not None and crs.linear_units_factor:
        factor = crs.linear_units_factor[1]
        px, py = px * factor, py * factor
    return px, py


def open_scene(path: Path) -> Scene:
    """Read a scene's header, or raise a one-line SarkitError naming the file."""
    if not path.exists():
        raise SarkitError(f"{path}: no such file")
    if path.is_dir():
        raise SarkitError(f"{path}: is a folder, expected a raster file")
    try:
        with rasterio.open(path) as ds:
            width, height, count = ds.width, ds.height, ds.count
            gcps, gcp_crs = ds.gcps
            crs = ds.crs or (gcp_crs if gcps else None)
            transform = ds.transform
            if gcps and ds.transform.is_identity:
                transform = from_gcps(gcps)
            else:
                gcps = None
            if ds.crs is None and not gcps:
                crs = None
            scene = Scene(
                path=path,
                width=width,
                height=height,
                count=count,
                dtype=ds.dtypes[0] if count else "",
                crs=crs.to_string() if crs else None,
                transform=transform,
                gcps=list(gcps) if gcps else None,
                nodata=ds.nodata,
                tags={**ds.tags(), **ds.tags(ns="IMAGE_STRUCTURE")},
                descriptions=tuple(ds.descriptions),
                pixel_m=None,
            )
            if crs is not None:
                center_lat = None
                if crs.is_geographic:
                    center_lat = (transform * (width / 2, height / 2))[1]
                scene.pixel_m = pixel_size_m(transform, crs, center_lat)
    except RasterioIOError as exc:
        message = str(exc).splitlines()[0] if str(exc) else "not a readable raster"
        if str(path) in message:
            message = message.replace(str(path), "").strip(" :")
        reason = message or "unknown format"
        raise SarkitError(f"{path}: cannot read as a raster ({reason})") from None
    if width == 0 or height == 0 or count == 0:
        raise SarkitError(f"{path}: empty raster ({width}x{height}, {count} bands)")
    return scene


def gdal_message(exc: BaseException) -> str:
    """The most specific first line GDAL gave: rasterio often wraps it as 'see previous'."""
    message = ""
    while exc is not None:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if text and "previous exception" not in text:
            message = text
        exc = exc.__cause__ or exc.__context__
    return message or "unknown GDAL error"


def resolve_band(scene: Scene, band: str, polarization_of) -> tuple[int, str | None]:
    """`--band` as a 1-based index or a polarisation name (VV, VH, HH, HV)."""
    if band.isdigit():
        index = int(band)
        if not 1 <= index <= scene.count:
            raise SarkitError(f"{scene.path}: band {index} does not exist (it has {scene.count})")
        return index, polarization_of(scene.path, scene.tags, scene.descriptions[index - 1])
    wanted = band.upper()
    for i, desc in enumerate(scene.descriptions, start=1):
        if polarization_of(scene.path, {}, desc) == wanted and desc:
            return i, wanted
    only = scene.descriptions[0] if scene.count == 1 else None
    if scene.count == 1 and polarization_of(scene.path, scene.tags, only) == wanted:
        return 1, wanted
    raise SarkitError(f"{scene.path}: no band with polarisation {wanted}")


#: Side of the square a zero run must fill to count as a fill border rather than speckle.
ZERO_RUN = 5


def zero_fill(zeros: np.ndarray) -> np.ndarray:
    """Morphological opening of the zero mask by a ZERO_RUN square, as separable 1-D min/max
    filters on uint8 (several times faster than a 2-D binary opening)."""
    from scipy.ndimage import maximum_filter1d, minimum_filter1d

    z = zeros.view(np.uint8)
    for axis in (0, 1):
        z = minimum_filter1d(z, ZERO_RUN, axis=axis, mode="nearest")
    for axis in (0, 1):
        z = maximum_filter1d(z, ZERO_RUN, axis=axis, mode="nearest")
    return z.view(bool)


def valid_mask(values: np.ndarray, nodata: float | None, zero_runs: bool = False) -> np.ndarray:
    """True where a pixel carries signal. NaN is never valid; `nodata` (may be 0) is not.

    With `zero_runs` (a scene whose zero border carries no nodata tag), only zeros that fill
    a ZERO_RUN x ZERO_RUN square are nodata: an 8-bit product quantises many dark speckle
    pixels to 0 as well (a quarter of the Umbra Yasur scene), and those are signal.
    """
    if np.iscomplexobj(values):
        mask = np.isfinite(values.real) & np.isfinite(values.imag)
        if nodata is not None:
            mask &= np.abs(values) != nodata
        return mask
    if values.dtype.kind == "f":
        mask = np.isfinite(values)
    else:
        mask = np.ones(values.shape, dtype=bool)
    if zero_runs:
        zeros = values == 0
        if np.count_nonzero(zeros) >= ZERO_RUN * ZERO_RUN:
            mask &= ~zero_fill(zeros)
    elif nodata is not None and not math.isnan(nodata):
        mask &= values != nodata
    return mask


def sample_windows(width: int, height: int, max_pixels: int, block: int = 256) -> list[Window]:
    """Windows whose union is a sparse, even sample of the scene (the whole scene if small).

    A decimated read of a block-tiled file still touches every block; a few whole blocks
    spread over the scene give the same statistics for a fraction of the I/O.
    """
    if width * height <= max_pixels:
        return [Window(0, 0, width, height)]
    n = max(1, int(max_pixels // (block * block)))
    per_axis = max(1, int(math.sqrt(n)))
    windows = []
    for i in range(per_axis):
        for j in range(per_axis):
            col = int((j + 0.5) * width / per_axis - block / 2)
            row = int((i + 0.5) * height / per_axis - block / 2)
            col = min(max(col, 0), max(width - block, 0))
            row = min(max(row, 0), max(height - block, 0))
            windows.append(Window(col, row, min(block, width), min(block, height)))
    return windows
