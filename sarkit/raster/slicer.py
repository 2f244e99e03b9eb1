"""`slice`: one scene -> uint8 GeoTIFF tiles at one or more ground sizes, one record per tile.

Reads by windows only (memory is bounded by a few tiles, whatever the scene size), in forked
worker processes, each with its own dataset handle. Tiles are quantised through a lookup
table fitted once per scene, encoded as GeoTIFF bytes without a GDAL dataset per tile
(:mod:`sarkit.raster.tiff`), written under a temporary name and renamed; a rerun reuses
tiles already written.
"""

from __future__ import annotations

import collections
import math
import multiprocessing
import secrets
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.windows import Window

from sarkit import log, sensors
from sarkit.atomic import atomic_path, write_chunks
from sarkit.errors import SarkitError, UsageError
from sarkit.plugins import lookup
from sarkit.raster import provenance, radiometry
from sarkit.raster.mapped import MappedBand
from sarkit.raster.prefetch import SUPPORTED as CAN_PREFETCH
from sarkit.raster.prefetch import BlockIndex, Prefetcher
from sarkit.raster.quantise import (
    NODATA_OUT,
    apply_lut,
    build_lut,
    gather,
    screening_lut,
    to_amplitude,
)
from sarkit.raster.scene import (
    ZERO_RUN,
    Scene,
    gdal_message,
    open_scene,
    resolve_band,
    sample_windows,
    valid_mask,
)
from sarkit.raster.tiff import TileEncoder
from sarkit.raster.windows import TileSpec, plan, window_size
from sarkit.report import Report

STATS_SAMPLE_PIXELS = 4_000_000  # read for the fit, in whole blocks spread over the scene
FIT_PIXELS = 1_000_000  # of which the fit sees about this many (evenly strided)
#: tiles whose blocks the kernel is asked to read before a worker gets to them: enough to
#: cover the disk's latency and the tiles in flight, few enough to keep the page cache it
#: fills small (24 x 4 MB for 1024-px float32 tiles)
PREFETCH_AHEAD = 24
#: tiles per task sent to a worker: the parent shares the cores with busy workers, so it
#: answers late; a few tiles per task keep each worker fed between its answers
TILES_PER_TASK = 4
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
    #: tells this run's scene claims from an earlier run's (see provenance.claim)
    run_id: str = field(default_factory=lambda: secrets.token_hex(8))


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

    def candidates(self) -> list[float]:
        """Values that may be nodata (besides NaN): where the exact mask must look."""
        if self.zero_runs:
            return [0.0]
        return [] if self.value is None else [self.value]


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


#: a scene whose sampled pixels fall this much on one grey level gives blank tiles
CONSTANT_SHARE = 0.98
CONSTANT_MIN_SAMPLE = 64  #: fewer sampled pixels than this say nothing about contrast


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


def fit_windows(ds, band: int) -> list[Window]:
    """A sparse sample of whole blocks over the scene, for its quantiser fit.

    Windows are snapped to the block grid: a window across four blocks would read all four
    (four times the I/O for the same pixels, on the serial path before any tile starts)."""
    bh, bw = ds.block_shapes[band - 1] if ds.block_shapes else (256, 256)
    size = min(max(bw, 128), 1024)
    return [
        Window(
            w.col_off - (w.col_off % bw if bw <= size else 0),
            w.row_off - (w.row_off % bh if bh <= size else 0),
            w.width,
            w.height,
        )
        for w in sample_windows(ds.width, ds.height, STATS_SAMPLE_PIXELS, size)
    ]


def read_sample(ds, band: int, nodata: NodataRule, windows: list[Window]) -> np.ndarray:
    """The valid raw pixels of the fit windows, thinned to about FIT_PIXELS: the blocks give
    the spatial spread; a million of their pixels pin percentiles to well under one output
    level, at a third of the sort's time on the whole sample."""
    pieces = []
    for window in windows:
        values = ds.read(band, window=window)
        pieces.append(values[nodata.mask(values)])
    sample = np.concatenate(pieces) if pieces else np.empty(0, np.float32)
    return sample[:: max(1, sample.size // FIT_PIXELS)]


def fit_quantiser(sample: np.ndarray, radiometry: str, quantiser) -> dict[str, Any]:
    """Scene-level parameters from the sample (not per tile, so neighbouring tiles agree)."""
    return quantiser.fit(to_amplitude(sample, radiometry))


def band_units(ds, band: int) -> list[str]:
    """The band's unit and unit-like metadata (what a product says its values are in)."""
    units = [ds.units[band - 1] or ""] if ds.units else []
    for tags in (ds.tags(band), ds.tags()):
        units += [str(v) for k, v in tags.items() if "UNIT" in k.upper()]
    return units


class _ThreadDatasets(threading.local):
    """One open dataset per worker thread (a GDAL handle must not be shared by threads)."""

    def __init__(self, path: Path, opened: list, lock: threading.Lock):
        self.path, self.opened, self.lock, self.ds = path, opened, lock, None

    def get(self):
        if self.ds is None:
            self.ds = rasterio.open(self.path)
            with self.lock:
                self.opened.append(self.ds)
        return self.ds


_WORKER: dict[str, Any] = {}


def _init_worker(job: SceneJob, forked: bool = False) -> None:
    """Each worker (a forked process, or the one thread) keeps the job and its own handle."""
    if forked:  # Ctrl-C is the parent's to handle: it cancels the pool and says so
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER["job"] = job
    _WORKER["datasets"] = _ThreadDatasets(job.path, [], threading.Lock())


def _work(specs: list[TileSpec]) -> list[TileResult]:
    job, datasets = _WORKER["job"], _WORKER["datasets"]
    return [job.work(spec, datasets) for spec in specs]


def slice_scene(scene_path: Path, options: SliceOptions, report: Report) -> Iterator[dict]:
    """Validate the scene and its options at once (errors name the file), then stream tiles."""
    job = SceneJob(Path(scene_path), options, report)
    return job.run()


class SceneJob:
    """Everything fixed for one scene: sensor, band, sizes, nodata rule, quantiser and fit."""

    def __init__(self, path: Path, options: SliceOptions, report: Report):
        self.path, self.options, self.report = path, options, report
        self.scene = scene = open_scene(path)
        self.profile = (
            sensors.get(options.sensor)
            if options.sensor != "auto"
            else sensors.detect(path, scene.tags)
        )
        self.band, self.polarization = resolve_band(scene, options.band, sensors.polarization_of)
        pixel_m = scene.pixel_m
        if pixel_m is None:
            if not options.pixel_size:
                raise SarkitError(
                    f"{path}: has no georeferencing (no CRS or GCPs); pass --pixel-size "
                    "METRES to slice it without coordinates"
                )
            pixel_m = (options.pixel_size, options.pixel_size)
        self.pixel_m = pixel_m
        self.sizes = tile_sizes(scene, options, pixel_m)
        self.nodata = parse_nodata(options.nodata, scene)
        qname = options.quantiser
        if qname == "auto":
            qname = "none" if scene.dtype == "uint8" else "log-percentile"
        self.quantiser = lookup("sarkit_quantisers", qname, "quantiser")
        if options.compress not in COMPRESSIONS:
            raise UsageError(f"--compress must be one of {', '.join(COMPRESSIONS)}")
        self.specs, partial = plan(
            scene.width, scene.height, self.sizes, options.keep_partial, options.min_coverage
        )
        self.prefetcher: Prefetcher | None = None
        self.mapped: MappedBand | None = None
        try:
            with rasterio.open(path) as ds:
                windows = fit_windows(ds, self.band)
                blocks = BlockIndex.read(ds, self.band)
                if blocks is not None and CAN_PREFETCH:
                    # the fit's reads all in flight at once, then the first tiles' while it fits
                    self.prefetcher = Prefetcher(path, blocks)
                    self.prefetcher.advise_now(
                        [(w.col_off, w.row_off, w.width, w.height) for w in windows]
                    )
                    for spec in self.specs[:PREFETCH_AHEAD]:
                        self.prefetch(spec)
                sample = read_sample(ds, self.band, self.nodata, windows)
                self.radiometry, self.radiometry_reason = radiometry.decide(
                    options.radiometry,
                    path,
                    scene.dtype,
                    band_units(ds, self.band),
                    self.profile.name,
                    self.profile.radiometry,
                    sample,
                )
                self.params = fit_quantiser(sample, self.radiometry, self.quantiser)
                self.check_contrast(sample)
                self.lut = build_lut(self.quantiser, self.params, scene.dtype, self.radiometry)
                if self.lut is not None:  # the in-place path is a table lookup
                    self.mapped = MappedBand.probe(ds, self.band, blocks)
        except rasterio.errors.RasterioIOError as exc:
            self.close()
            raise SarkitError(f"{path}: read failed ({gdal_message(exc)})") from None
        except BaseException:  # the prefetch thread and the map's file go with the job
            self.close()
            raise
        self.screen = self.nonfinite_screen = None
        if self.lut is not None:
            self.screen = screening_lut(self.lut, scene.dtype, self.nodata.candidates())
            if self.nodata.zero_runs:  # see screened()
                self.nonfinite_screen = screening_lut(self.lut, scene.dtype, [])
        if options.radiometry == "auto":
            log.info(f"{path}: radiometry {self.radiometry} ({self.radiometry_reason})")
        self.provenance = provenance.digest(
            {
                "scene": provenance.scene_identity(path),
                "band": self.band,
                "pixel_m": self.pixel_m,
                "sizes": self.sizes,
                "keep_partial": options.keep_partial,
                "min_coverage": options.min_coverage,
                "radiometry": self.radiometry,
                "nodata": [self.nodata.value, self.nodata.zero_runs],
                "quantiser": self.quantiser.name,
                "params": self.params,
                "compress": options.compress,
            }
        )
        try:
            provenance.claim(
                Path(options.out_dir) / path.stem, path, options.run_id, options.overwrite
            )
        except BaseException:
            self.close()
            raise
        if partial:
            report.skip("partial edge tile", partial)
        self.emitted: dict[int, str] = {}
        self.nodata_tiles = 0
        self.tags = {
            "SARKIT_SCENE": str(path),
            "SARKIT_SENSOR": self.profile.name,
            "POLARIZATION": self.polarization or "",
            "SARKIT_QUANTISER": self.quantiser.name,
            provenance.TAG: self.provenance,
        }
        # GCP-georeferenced tiles, deflate and LZW are written through a GDAL dataset each
        largest = max((s.width * s.height for s in self.specs), default=0)
        self.encoder = (
            TileEncoder(scene.crs, NODATA_OUT, self.tags, options.compress)
            if not scene.gcps and TileEncoder.supports(options.compress, largest)
            else None
        )

    def check_contrast(self, sample: np.ndarray) -> None:
        """A scene whose sample quantises to (nearly) one grey level gives blank tiles:
        wrong radiometry or quantiser for its values, or a flat scene. Never passed on."""
        if sample.size < CONSTANT_MIN_SAMPLE:
            return
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            levels = self.quantiser.apply(to_amplitude(sample, self.radiometry), self.params, None)
        share = radiometry.constant_share(levels)
        if share >= CONSTANT_SHARE:
            raise SarkitError(
                f"{self.path}: its tiles would be nearly constant ({100 * share:.0f}% of the "
                f"sampled pixels on one grey level) with radiometry {self.radiometry} "
                f"({self.radiometry_reason}) and quantiser {self.quantiser.name}; check "
                "--radiometry and --quantiser (a flat scene holds nothing to caption)"
            )

    def tile_id(self, spec: TileSpec) -> str:
        return f"{self.path.stem}/{spec.scale}/r{spec.row:03d}_c{spec.col:03d}"

    def tile_path(self, spec: TileSpec) -> Path:
        return Path(self.options.out_dir) / f"{self.tile_id(spec)}.tif"

    def read(self, ds, spec: TileSpec) -> tuple[np.ndarray, np.ndarray | None]:
        """The window's pixels, and the validity of a kept partial tile padded with nodata
        (None for a whole window: see `quantise`)."""
        c0, r0, iw, ih = spec.inside(self.scene.width, self.scene.height)
        # GDAL reads uncompressed tiled/striped files straight into the array, bypassing
        # its block cache (every block is read once here): about 15% off a tile's time
        with rasterio.Env(GTIFF_DIRECT_IO=True):
            values = ds.read(self.band, window=Window(c0, r0, iw, ih))
        if (iw, ih) == (spec.width, spec.height):
            return values, None
        valid = self.nodata.mask(values)
        full = np.zeros((spec.height, spec.width), dtype=values.dtype)
        full_valid = np.zeros((spec.height, spec.width), dtype=bool)
        inner = np.s_[
            r0 - spec.row_off : r0 - spec.row_off + ih, c0 - spec.col_off : c0 - spec.col_off + iw
        ]
        full[inner], full_valid[inner] = values, valid
        return full, full_valid

    def check_existing(self, path: Path, spec: TileSpec) -> float | None:
        """A tile from an earlier run, if this run would write the same (its provenance
        matches; see :mod:`sarkit.raster.provenance`) and it reads back whole: its nodata
        fraction. None: it is another run's, or damaged (e.g. cut short by a power loss),
        and must be written again."""
        try:
            with rasterio.open(path) as existing:
                if existing.tags().get(provenance.TAG) != self.provenance or (
                    existing.height,
                    existing.width,
                ) != (spec.height, spec.width):
                    return None
                return float(np.mean(existing.read(1) == NODATA_OUT))
        except rasterio.errors.RasterioError:
            return None

    def screened(
        self, gather: Callable[[np.ndarray], tuple[np.ndarray, int] | None]
    ) -> np.ndarray | None:
        """A whole tile's bytes, gathered through the screening tables, when they prove it
        holds no nodata; else None, and the tile takes the exact mask.

        No pixel on a screened entry: no nodata. Under the zero-run rule a tile with fewer
        screened pixels than a nodata square holds too few zeros for a fill, so its zeros
        are dark signal (real scenes have some in most tiles): a second pass through a table
        that screens only NaN and infinities settles it without the mask's passes."""
        got = gather(self.screen)
        if (
            got is not None
            and 0 < got[1] < ZERO_RUN * ZERO_RUN
            and self.nonfinite_screen is not None
        ):
            got = gather(self.nonfinite_screen)
        return got[0] if got is not None and got[1] == 0 else None

    def quantise_in_place(self, spec: TileSpec) -> np.ndarray | None:
        """An uncompressed scene's tile, quantised from the page cache with no read (see
        :mod:`sarkit.raster.mapped`), when the screening tables show it holds no nodata;
        else None, and the tile is read and masked pixel by pixel."""
        if self.mapped is None:
            return None
        window = (spec.col_off, spec.row_off, spec.width, spec.height)
        return self.screened(lambda table: self.mapped.gather(*window, table))

    def quantise(
        self, values: np.ndarray, valid: np.ndarray | None, already_screened: bool = False
    ) -> tuple[np.ndarray | None, float]:
        """The tile's bytes (None if it is mostly nodata) and its nodata fraction.

        With a lookup table, a whole window first goes through the screening tables (unless
        the in-place path `already_screened` it); where they prove it holds no nodata, the
        mask's passes are skipped."""
        if self.lut is not None and valid is None and not already_screened:
            pixels = self.screened(lambda table: gather(values, table))
            if pixels is not None:
                return pixels, 0.0
        if valid is None:
            valid = self.nodata.mask(values)
        frac = 1.0 - float(np.count_nonzero(valid)) / valid.size
        if frac > self.options.max_nodata:
            return None, frac
        if self.lut is not None:
            return apply_lut(values, self.lut, valid), frac
        return self.quantiser.apply(to_amplitude(values, self.radiometry), self.params, valid), frac

    def work(self, spec: TileSpec, datasets: _ThreadDatasets) -> TileResult:
        """Runs in a worker thread: read, screen, quantise, write one tile."""
        path = self.tile_path(spec)
        try:
            if path.exists() and not self.options.overwrite:
                frac = self.check_existing(path, spec)
                if frac is not None:
                    status = "nodata" if frac > self.options.max_nodata else "exists"
                    return TileResult(spec, path, status, frac)
            pixels, frac = self.quantise_in_place(spec), 0.0
            if pixels is None:  # a whole window the in-place path saw was screened there
                values, valid = self.read(datasets.get(), spec)
                pixels, frac = self.quantise(
                    values, valid, already_screened=self.mapped is not None
                )
            if pixels is None:
                return TileResult(spec, path, "nodata", frac)
            if self.encoder is not None:
                write_chunks(path, self.encoder.encode(pixels, tile_transform(self.scene, spec)))
            else:
                write_tile(path, pixels, self.scene, spec, self.options.compress, self.tags)
            return TileResult(spec, path, "written", frac)
        except rasterio.errors.RasterioError as exc:
            return TileResult(spec, path, "error", message=gdal_message(exc))

    def run(self) -> Iterator[dict]:
        """Tiles in plan order (parents first), at most 2 x workers in flight (bounded memory).

        Several workers are forked processes: the per-tile Python work (lookup table,
        encoding, and the GDAL write path where it is used) holds the GIL much of the time,
        so threads barely scale."""
        workers = max(self.options.workers, 1)
        pending: collections.deque[tuple[int, Future]] = collections.deque()
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_init_worker,
                initargs=(self, True),
            )
        else:
            _init_worker(self)
            pool = ThreadPoolExecutor(max_workers=1)
        try:
            with pool:
                for start in range(0, len(self.specs), TILES_PER_TASK):
                    batch = self.specs[start : start + TILES_PER_TASK]
                    pending.append((start, pool.submit(_work, batch)))
                    if len(pending) >= 2 * workers:
                        yield from self.finish(*pending.popleft())
                while pending:
                    yield from self.finish(*pending.popleft())
            if self.specs and not self.emitted and self.nodata_tiles == len(self.specs):
                self.report.error(
                    f"{self.path}: every tile was nodata (NaN, the nodata value or zero "
                    "fill); nothing sliced (see --nodata and --max-nodata)"
                )
        except BrokenProcessPool:  # killed: out of memory, or a bus error in a shrunk map
            raise SarkitError(
                f"{self.path}: a worker process died while slicing it (out of memory, or the "
                "file changed while it was read); its tiles written so far are kept"
            ) from None
        finally:  # handles opened in this process (forked workers close theirs on exit)
            self.close()
            datasets = _WORKER.pop("datasets", None)
            for ds in datasets.opened if datasets else []:
                ds.close()

    def prefetch(self, spec: TileSpec) -> None:
        """Ask for a tile's pixels ahead of time, unless it is there from an earlier run."""
        if self.prefetcher is not None and (
            self.options.overwrite or not self.tile_path(spec).exists()
        ):
            self.prefetcher.want(spec.inside(self.scene.width, self.scene.height))

    def close(self) -> None:
        if self.mapped is not None:
            self.mapped.close()
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None

    def finish(self, start: int, future: Future) -> Iterator[dict]:
        """A task's tiles, in order; each finished tile lets one more be prefetched."""
        for index, result in enumerate(future.result(), start):
            if index + PREFETCH_AHEAD < len(self.specs):
                self.prefetch(self.specs[index + PREFETCH_AHEAD])
            yield from self.emit(index, result)

    def emit(self, index: int, result: TileResult) -> Iterator[dict]:
        spec = result.spec
        if result.status == "nodata":
            self.report.skip("mostly nodata")
            self.nodata_tiles += 1
            return
        if result.status == "error":
            self.report.error(
                f"{self.path}: tile window {spec.window}: read failed ({result.message})"
            )
            return
        if result.status == "exists":
            notes = self.report.notes
            notes["reused (already written)"] = int(notes.get("reused (already written)", 0)) + 1
        else:
            self.report.ok()
        self.emitted[index] = self.tile_id(spec)
        yield self.record(result)

    def parent_id(self, spec: TileSpec) -> str | None:
        """The nearest larger tile that was emitted (a skipped parent passes its role up)."""
        parent = spec.parent
        while parent is not None:
            if parent in self.emitted:
                return self.emitted[parent]
            parent = self.specs[parent].parent
        return None

    def record(self, result: TileResult) -> dict:
        spec, scene = result.spec, self.scene
        px, py = self.pixel_m
        record = {
            "id": self.tile_id(spec),
            "path": str(result.path),
            "scene": str(self.path),
            "scale": spec.scale,
            "parent": self.parent_id(spec),
            "window": spec.window,
            "grid": [spec.row, spec.col],
            "pixel_m": round((px + py) / 2, 6),
            "ground_m": self.options.ground_sizes[spec.level],
            "crs": scene.crs,
            "transform": list(tile_transform(scene, spec))[:6] if scene.crs else None,
            "sensor": self.profile.name,
            "platform": self.profile.platform,
            "band": self.profile.band,
            "polarization": self.polarization,
            "band_index": self.band,
            "radiometry": self.radiometry,
            "radiometry_reason": self.radiometry_reason,
            "quantiser": {"name": self.quantiser.name, **self.params},
            "nodata_frac": round(result.nodata_frac, 6),
            "coverage": round(spec.coverage, 6),
        }
        if abs(px - py) > 0.01 * max(px, py):
            record["pixel_m_xy"] = [round(px, 6), round(py, 6)]
        if scene.gcps:
            record["georef"] = "gcps"
        return record


def tile_transform(scene: Scene, spec: TileSpec) -> Affine:
    return scene.transform @ Affine.translation(spec.col_off, spec.row_off)


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
    with atomic_path(path, fsync=False) as tmp, rasterio.open(tmp, "w", **profile) as out:
        out.write(pixels, 1)
        out.update_tags(**tags)
        if scene.gcps:
            out.gcps = (gcps, gcp_crs)
