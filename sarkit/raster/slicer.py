"""`slice`: one scene -> uint8 GeoTIFF tiles at one or more ground sizes, one record per tile.

Reads by windows only (memory is bounded by a few tiles, whatever the scene size), in a
thread pool (GDAL releases the GIL while it reads and compresses), with one dataset handle
per thread. Tiles are quantised with parameters fitted once per scene, written under a
temporary name and renamed, and a rerun reuses tiles already written.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.windows import Window

from sarkit import sensors
from sarkit.atomic import atomic_path
from sarkit.errors import SarkitError, UsageError
from sarkit.plugins import lookup
from sarkit.raster.quantise import NODATA_OUT, to_amplitude
from sarkit.raster.scene import (
    Scene,
    gdal_message,
    open_scene,
    resolve_band,
    sample_windows,
    valid_mask,
)
from sarkit.raster.windows import TileSpec, plan, window_size
from sarkit.report import Report

STATS_SAMPLE_PIXELS = 4_000_000
COMPRESSIONS = ("zstd", "deflate", "lzw", "none")


@dataclass
class SliceOptions:
    out_dir: Path
    ground_sizes: list[float] = field(default_factory=lambda: [1000.0])
    band: str = "1"
    sensor: str = "auto"
    quantiser: str = "auto"
    radiometry: str = "auto"
    nodata: str = "auto"
    keep_partial: bool = False
    min_coverage: float = 0.5
    max_nodata: float = 0.5
    workers: int = 2
    compress: str = "zstd"
    overwrite: bool = False
    pixel_size: float | None = None


@dataclass
class TileResult:
    spec: TileSpec
    path: Path
    status: str  # "written", "exists", "nodata", "error"
    nodata_frac: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class NodataRule:
    value: float | None
    zero_runs: bool = False

    def mask(self, values: np.ndarray) -> np.ndarray:
        return valid_mask(values, self.value, self.zero_runs)


def parse_nodata(value: str, scene: Scene) -> NodataRule:
    """auto: the tag, else zero-filled borders (zeros filling a small square; geocoded
    products fill their border with 0 and often set no tag); none: only NaN is nodata;
    a number: exactly that value."""
    if value == "auto":
        if scene.nodata is not None:
            return NodataRule(scene.nodata)
        return NodataRule(0.0, zero_runs=True)
    if value == "none":
        return NodataRule(None)
    try:
        return NodataRule(float(value))
    except ValueError:
        raise UsageError(f"--nodata must be auto, none or a number, not '{value}'") from None


def scene_radiometry(options: SliceOptions, scene: Scene, profile) -> str:
    if options.radiometry != "auto":
        return options.radiometry
    if scene.dtype.startswith("complex") or scene.dtype == "uint8":
        return "amplitude"
    return profile.radiometry


def tile_sizes(scene: Scene, options: SliceOptions, pixel_m: tuple[float, float]) -> list:
    sizes = []
    previous = math.inf
    for ground in options.ground_sizes:
        if ground >= previous:
            raise UsageError("--ground-size must list sizes from large to small")
        previous = ground
        w, h = window_size(ground, pixel_m[0]), window_size(ground, pixel_m[1])
        if w < 1 or h < 1:
            raise SarkitError(
                f"{scene.path}: ground size {ground:g} m is smaller than a pixel "
                f"({pixel_m[0]:.3g} x {pixel_m[1]:.3g} m)"
            )
        if w > scene.width or h > scene.height:
            raise SarkitError(
                f"{scene.path}: ground size {ground:g} m needs {w}x{h} px but the scene is "
                f"{scene.width}x{scene.height} px ({scene.width * pixel_m[0]:.0f} x "
                f"{scene.height * pixel_m[1]:.0f} m)"
            )
        sizes.append((w, h))
    return sizes


def fit_quantiser(ds, band: int, nodata: NodataRule, radiometry: str, quantiser) -> dict[str, Any]:
    """Scene-level parameters from a sparse sample of whole blocks (not per tile, so
    neighbouring tiles agree)."""
    block = ds.block_shapes[band - 1][1] if ds.block_shapes else 256
    block = min(max(block, 128), 1024)
    pieces = []
    for window in sample_windows(ds.width, ds.height, STATS_SAMPLE_PIXELS, block):
        values = ds.read(band, window=window)
        pieces.append(to_amplitude(values[nodata.mask(values)], radiometry))
    sample = np.concatenate(pieces) if pieces else np.empty(0, np.float32)
    return quantiser.fit(sample)


class _Handles(threading.local):
    ds: Any = None


def slice_scene(scene_path: Path, options: SliceOptions, report: Report) -> Iterator[dict]:
    scene_path = Path(scene_path)
    scene = open_scene(scene_path)
    profile = (
        sensors.get(options.sensor)
        if options.sensor != "auto"
        else sensors.detect(scene_path, scene.tags)
    )
    band, polarization = resolve_band(scene, options.band, sensors.polarization_of)
    pixel_m = scene.pixel_m
    if pixel_m is None:
        if not options.pixel_size:
            raise SarkitError(
                f"{scene_path}: has no georeferencing (no CRS or GCPs); pass --pixel-size "
                "METRES to slice it without coordinates"
            )
        pixel_m = (options.pixel_size, options.pixel_size)
    sizes = tile_sizes(scene, options, pixel_m)
    nodata = parse_nodata(options.nodata, scene)
    radiometry = scene_radiometry(options, scene, profile)
    qname = options.quantiser
    if qname == "auto":
        qname = "none" if scene.dtype == "uint8" else "log-percentile"
    quantiser = lookup("sarkit_quantisers", qname, "quantiser")
    if options.compress not in COMPRESSIONS:
        raise UsageError(f"--compress must be one of {', '.join(COMPRESSIONS)}")

    try:
        with rasterio.open(scene_path) as ds:
            params = fit_quantiser(ds, band, nodata, radiometry, quantiser)
    except rasterio.errors.RasterioIOError as exc:
        raise SarkitError(f"{scene_path}: read failed ({gdal_message(exc)})") from None

    specs, partial = plan(
        scene.width, scene.height, sizes, options.keep_partial, options.min_coverage
    )
    if partial:
        report.skip("partial edge tile", partial)
    stem = scene_path.stem
    tile_root = Path(options.out_dir) / stem
    handles = _Handles()
    opened: list = []
    lock = threading.Lock()

    def dataset():
        if handles.ds is None:
            handles.ds = rasterio.open(scene_path)
            with lock:
                opened.append(handles.ds)
        return handles.ds

    def tile_path(spec: TileSpec) -> Path:
        return tile_root / spec.scale / f"r{spec.row:03d}_c{spec.col:03d}.tif"

    def work(spec: TileSpec) -> TileResult:
        path = tile_path(spec)
        try:
            if path.exists() and not options.overwrite:
                with rasterio.open(path) as existing:
                    frac = float(np.mean(existing.read(1) == NODATA_OUT))
                return TileResult(spec, path, "exists", frac)
            c0, r0, iw, ih = spec.inside(scene.width, scene.height)
            values = dataset().read(band, window=Window(c0, r0, iw, ih))
            valid = nodata.mask(values)
            if (iw, ih) != (spec.width, spec.height):  # a kept partial tile: pad with nodata
                full = np.zeros((spec.height, spec.width), dtype=values.dtype)
                full_valid = np.zeros((spec.height, spec.width), dtype=bool)
                full[
                    r0 - spec.row_off : r0 - spec.row_off + ih,
                    c0 - spec.col_off : c0 - spec.col_off + iw,
                ] = values
                full_valid[
                    r0 - spec.row_off : r0 - spec.row_off + ih,
                    c0 - spec.col_off : c0 - spec.col_off + iw,
                ] = valid
                values, valid = full, full_valid
            frac = 1.0 - float(np.count_nonzero(valid)) / valid.size
            if frac > options.max_nodata:
                return TileResult(spec, path, "nodata", frac)
            pixels = quantiser.apply(to_amplitude(values, radiometry), params, valid)
            write_tile(
                path,
                pixels,
                scene,
                spec,
                options.compress,
                tags={
                    "SARKIT_SCENE": str(scene_path),
                    "SARKIT_SENSOR": profile.name,
                    "POLARIZATION": polarization or "",
                    "SARKIT_QUANTISER": quantiser.name,
                },
            )
            return TileResult(spec, path, "written", frac)
        except rasterio.errors.RasterioError as exc:
            return TileResult(spec, path, "error", message=gdal_message(exc))

    base = {
        "scene": str(scene_path),
        "sensor": profile.name,
        "platform": profile.platform,
        "band": profile.band,
        "polarization": polarization,
        "band_index": band,
        "radiometry": radiometry,
        "quantiser": {"name": quantiser.name, **params},
    }
    emitted: dict[int, str] = {}
    max_in_flight = max(2 * options.workers, 2)
    try:
        with ThreadPoolExecutor(max_workers=max(options.workers, 1)) as pool:
            pending: collections.deque[tuple[int, Future]] = collections.deque()
            index_iter = iter(range(len(specs)))
            for index in index_iter:
                pending.append((index, pool.submit(work, specs[index])))
                if len(pending) < max_in_flight:
                    continue
                yield from _drain(
                    pending, 1, specs, emitted, base, scene, pixel_m, options, stem, report
                )
            yield from _drain(
                pending, len(pending), specs, emitted, base, scene, pixel_m, options, stem, report
            )
    finally:
        for ds in opened:
            ds.close()


def _drain(pending, n, specs, emitted, base, scene, pixel_m, options, stem, report):
    for _ in range(n):
        index, future = pending.popleft()
        result: TileResult = future.result()
        spec = result.spec
        if result.status == "nodata":
            report.skip("mostly nodata")
            continue
        if result.status == "error":
            report.error(f"{scene.path}: tile window {spec.window}: read failed ({result.message})")
            continue
        if result.status == "exists":
            report.notes["reused (already written)"] = (
                int(report.notes.get("reused (already written)", 0)) + 1
            )
        else:
            report.ok()
        tile_id = f"{stem}/{spec.scale}/r{spec.row:03d}_c{spec.col:03d}"
        emitted[index] = tile_id
        yield tile_record(tile_id, result, spec, specs, emitted, base, scene, pixel_m, options)


def _parent_id(spec: TileSpec, specs: list[TileSpec], emitted: dict[int, str]) -> str | None:
    """The nearest larger tile that was emitted (a skipped parent passes its role up)."""
    parent = spec.parent
    while parent is not None:
        if parent in emitted:
            return emitted[parent]
        parent = specs[parent].parent
    return None


def tile_transform(scene: Scene, spec: TileSpec) -> Affine:
    return scene.transform @ Affine.translation(spec.col_off, spec.row_off)


def tile_record(tile_id, result, spec, specs, emitted, base, scene, pixel_m, options) -> dict:
    px, py = pixel_m
    record = {
        "id": tile_id,
        "path": str(result.path),
        **{k: base[k] for k in ("scene",)},
        "scale": spec.scale,
        "parent": _parent_id(spec, specs, emitted),
        "window": spec.window,
        "grid": [spec.row, spec.col],
        "pixel_m": round((px + py) / 2, 6),
        "ground_m": options.ground_sizes[spec.level],
        "crs": scene.crs,
        "transform": list(tile_transform(scene, spec))[:6] if scene.crs else None,
        **{k: v for k, v in base.items() if k != "scene"},
        "nodata_frac": round(result.nodata_frac, 6),
        "coverage": round(spec.coverage, 6),
    }
    if abs(px - py) > 0.01 * max(px, py):
        record["pixel_m_xy"] = [round(px, 6), round(py, 6)]
    if scene.gcps:
        record["georef"] = "gcps"
    return record


def write_tile(
    path: Path,
    pixels: np.ndarray,
    scene: Scene,
    spec: TileSpec,
    compress: str,
    tags: dict[str, str],
) -> None:
    height, width = pixels.shape
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 1,
        "dtype": "uint8",
        "nodata": NODATA_OUT,
    }
    if width >= 256 and height >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if compress != "none":
        profile["compress"] = compress
        if compress == "deflate":
            profile["zlevel"] = 1  # speckle barely compresses; level 1 costs a third as much
        elif compress == "zstd":
            profile["zstd_level"] = 1
    if scene.gcps:
        gcps = [
            GroundControlPoint(
                g.row - spec.row_off, g.col - spec.col_off, g.x, g.y, g.z, g.id, g.info
            )
            for g in scene.gcps
        ]
        gcp_crs = rasterio.crs.CRS.from_user_input(scene.crs)
    elif scene.crs:
        profile["crs"] = scene.crs
        profile["transform"] = tile_transform(scene, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as out:
        out.write(pixels, 1)
        out.update_tags(**tags)
        if scene.gcps:
            out.gcps = (gcps, gcp_crs)
