"""One tile reader for every stage: the filter, the LLM image, the model and the tasks.

Every stage that looks at a tile reads it here, so the quality filter, the captioning LLM
and the model see the same pixels: one uint8 grey band in which 0 means nodata (or the
darkest 8-bit speckle, which an 8-bit product cannot tell apart; the filter's nodata
*region* rule separates the two) and 1..255 are data.

The rule per input kind, and why:

* **uint8 rasters** (``sarkit slice`` tiles, already 8-bit products such as the Umbra GEC
  clip, MSTAR JPEG chips): the values as they are. They are already quantised; stretching
  them again per tile would make a dark sea tile look like bright land and undo the
  scene-wide fit that keeps a slice's neighbouring tiles alike. Slice tiles reserve 0 for
  nodata. A nodata tag other than 0 is honoured: tagged pixels become 0 and true zeros 1.
* **Other dtypes** (uint16/int16 DN, float32 amplitude, power or dB, complex): the same
  compression ``sarkit slice`` applies by default (log amplitude clipped at the 1st and
  99.5th percentile, to 1..255), fitted on the tile's own valid pixels. SAR backscatter is
  heavy-tailed multiplicative speckle: a linear stretch spends the levels on a few bright
  scatterers and leaves the rest black (OPERA VH power spans 1e-6..1e-2), while the log
  turns speckle additive. Power and amplitude need no telling apart (ln p = 2 ln a and the
  percentile stretch cancels the factor). A tile with at least 10 % negative valid values
  is dB (amplitude and power never are negative; a few negatives are resampling ringing;
  the share ``sarkit slice`` uses), already a log, so it is stretched linearly.
  Nodata: NaN, infinities, the tag's value, and in linear data exact zeros (no log exists
  for them; fill and zero-power pixels alike become 0, as in 8-bit data). A tile without
  valid pixels reads as all 0.
* **Multi-band files**: 3+ band uint8 images (HRSID grey-as-RGB JPEG, PolSF Pauli-RGB PNG)
  become the rounded mean of their first three bands. For grey stored as RGB that is the
  grey value exactly; for Pauli-RGB the three bands are scattering mechanisms (double
  bounce, volume, surface), not display primaries, and an equal weight approximates the
  total power (span) where ITU-R 601 luma would weight volume 0.59 and surface 0.11. An
  alpha band (or PNG alpha) of 0 marks nodata. Multi-band rasters of other dtypes are a
  stack of polarisations or dates: band 1 is read, as ``sarkit slice`` does.

Decoders are fixed by suffix so a file always decodes the same way: PIL for JPEG, PNG and
other picture formats, GDAL (rasterio) for GeoTIFF and everything else, each falling back to
the other only when it does not recognise the format.

Decimation (``block_mean``) averages k x k blocks in numpy, zeros included: GDAL's average
resampling skips nodata-tagged zeros and so would brighten dark speckle.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sarkit.errors import SarkitError
from sarkit.raster.quantise import LogPercentile, to_amplitude

#: Suffixes PIL decodes first (its JPEG decoder is the reference for these chips).
PIL_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
#: Share of negative valid values from which a tile is dB (power and amplitude never are
#: negative; a few negatives are resampling ringing). The share ``sarkit slice`` uses.
NEGATIVE_DB = 0.10
#: PIL modes read as they are (others are converted to RGB or RGBA first).
PIL_MODES = {"L", "LA", "RGB", "RGBA", "I", "I;16", "I;16L", "I;16B", "F"}
#: The compression for non-8-bit tiles: slice's default, with its default percentiles.
STRETCH = LogPercentile()


class TileReadError(SarkitError):
    """A tile is missing or cannot be decoded; the one-line message names the path and why."""


class _NotRecognised(Exception):
    """The decoder does not know the format (the other decoder may)."""


def to_gray_u8(
    bands: np.ndarray, nodata: float | None = None, alpha: np.ndarray | None = None
) -> np.ndarray:
    """Bands (2-D, or bands first) -> one uint8 band, 0 = nodata, by the module's rule.

    For arrays a caller already holds (a window of a scene, a decoded chip); files go
    through `read_u8`.
    """
    data = np.asarray(bands)
    if data.ndim == 3:
        if data.shape[0] >= 3 and data.dtype == np.uint8:
            gray = _mean3(data, nodata)
            nodata = None  # applied per pixel over the bands
        else:
            gray = _single(data[0], nodata)
    elif data.ndim == 2:
        gray = _single(data, nodata)
    else:
        raise ValueError(f"expected a 2-D band or bands first, got shape {data.shape}")
    if alpha is not None:
        gray[np.asarray(alpha) == 0] = 0
    return gray


def _mean3(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """Rounded mean of the first three uint8 bands; pixels tagged in all three -> 0."""
    total = data[0].astype(np.uint16) + data[1] + data[2]
    gray = ((total + 1) // 3).astype(np.uint8)
    if nodata is not None and not math.isnan(nodata) and 0 < nodata <= 255:
        tagged = (data[0] == nodata) & (data[1] == nodata) & (data[2] == nodata)
        np.maximum(gray, 1, out=gray)
        gray[tagged] = 0
    return gray


def _single(band: np.ndarray, nodata: float | None) -> np.ndarray:
    if band.dtype == np.uint8:
        if nodata is None or math.isnan(nodata) or not 0 < nodata <= 255:
            return band  # untagged, tagged 0 (slice tiles), or a tag no uint8 can hold
        out = np.maximum(band, 1)
        out[band == nodata] = 0
        return out
    if band.dtype == np.bool_:
        return band.astype(np.uint8) * np.uint8(255)
    return _stretch(band, nodata)


def _stretch(band: np.ndarray, nodata: float | None) -> np.ndarray:
    """Non-8-bit band -> 1..255 by slice's log-percentile fit on the tile, 0 for nodata."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if np.iscomplexobj(band):
            values = np.abs(band).astype(np.float32)
        else:
            values = band.astype(np.float32)
        valid = np.isfinite(values)
        if nodata is not None and not math.isnan(nodata):
            valid &= band != nodata  # compared in the native dtype: exact for integers
        if not valid.any():
            return np.zeros(band.shape, np.uint8)
        if band.dtype.kind in "fi" and np.count_nonzero(values[valid] < 0) >= (
            NEGATIVE_DB * np.count_nonzero(valid)
        ):
            amplitude = to_amplitude(values, "db")
        else:
            amplitude = values
            valid &= values != 0
            if not valid.any():
                return np.zeros(band.shape, np.uint8)
        params = STRETCH.fit(amplitude[valid])
        return STRETCH.apply(amplitude, params, valid)


def _read_gdal(path: Path) -> np.ndarray:
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            src = rasterio.open(path)
        except RasterioIOError as exc:
            raise _NotRecognised(_one_line(exc)) from None
        with src:
            interp = list(src.colorinterp)
            alpha_band = interp.index(ColorInterp.alpha) + 1 if ColorInterp.alpha in interp else 0
            colour = [i + 1 for i in range(src.count) if i + 1 != alpha_band]
            if src.dtypes[0] == "uint8" and len(colour) >= 3:
                indexes = colour[:3]
            else:
                indexes = colour[:1] or [1]
            data = src.read(indexes)
            alpha = src.read(alpha_band) if alpha_band else None
            nodata = src.nodata
    return to_gray_u8(data, nodata, alpha)


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
    except UnidentifiedImageError as exc:
        raise _NotRecognised(_one_line(exc)) from None
    with im:
        im.load()
        if im.mode not in PIL_MODES:  # palette, bilevel, CMYK, ...: as RGB(A) pixels
            clear = "A" in im.mode or "a" in im.mode or "transparency" in im.info
            im = im.convert("RGBA" if clear else "RGB")
        mode = im.mode
        arr = np.asarray(im)
    if mode in ("RGB", "RGBA"):
        alpha = arr[..., 3] if mode == "RGBA" else None
        return to_gray_u8(np.moveaxis(arr[..., :3], -1, 0), None, alpha)
    if mode == "LA":
        return to_gray_u8(arr[..., 0], None, arr[..., 1])
    return to_gray_u8(arr, None)


def _one_line(exc: BaseException) -> str:
    """The error as one line; GDAL's own cause instead of rasterio's "see previous"."""
    cause = exc.__cause__ or exc.__context__
    if cause is not None and "previous exception" in str(exc):
        exc = cause
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_u8(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """The tile as 2-D uint8 grey, 0 = nodata (the module's rule); raises TileReadError.

    With ``max_side`` the tile is block-mean decimated to at most that many pixels a side
    (see `block_mean`).
    """
    p = Path(path)
    if not p.exists():
        raise TileReadError(f"{p}: tile not found")
    if p.is_dir():
        raise TileReadError(f"{p}: is a folder, not a tile")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise TileReadError(f"{p}: cannot read ({_one_line(exc)})") from None
    if size == 0:
        raise TileReadError(f"{p}: empty file (0 bytes)")
    gray = decode_gray(lambda: p, str(p))
    if max_side is not None:
        gray, _ = block_mean(gray, max_side)
    return gray


def decode_gray(source: Callable[[], Any], name: str) -> np.ndarray:
    """2-D uint8 grey from GDAL, else PIL (PIL first for its suffixes), with the one-line
    errors of every tile reader; `source()` gives each decoder a fresh path or stream and
    `name` is the file as messages show it."""
    readers = [_read_gdal, _read_pil]
    if Path(name).suffix.lower() in PIL_SUFFIXES:
        readers.reverse()
    unknown = []
    for reader in readers:
        try:
            gray = reader(source())
            break
        except _NotRecognised as exc:
            unknown.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
            raise TileReadError(
                f"{name}: pixels cannot be decoded, truncated or corrupt ({_one_line(exc)})"
            ) from None
    else:
        raise TileReadError(f"{name}: not a raster image ({'; '.join(unknown)})")
    if gray.ndim != 2 or gray.size == 0:
        raise TileReadError(f"{name}: no 2-D pixels (shape {gray.shape})")
    return gray


def read_f32(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """The tile as float32 in [0, 1] for a model: exactly ``read_u8(path, max_side) / 255``.

    Nodata is 0.0, as in the uint8 reading; the model sees the pixels the filter measured.
    """
    return read_u8(path, max_side).astype(np.float32) / np.float32(255.0)


def block_factor(shape: tuple[int, ...], max_side: int) -> int:
    """The integer block size that brings the longer side to at most ``max_side``."""
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, not {max_side}")
    return max(1, math.ceil(max(shape[:2]) / max_side))


def block_mean(gray: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    """Mean of k x k blocks (k from `block_factor`; remainder rows and columns cropped),
    rounded to uint8, and k.

    Zeros count as values, so dark speckle stays dark; a block that is all 0 stays 0.
    Integer blocks keep independent speckle independent (a fractional resampler would
    smear it into false spatial correlation).
    """
    k = block_factor(gray.shape, max_side)
    if k == 1:
        return gray, 1
    # a strip thinner than k keeps its short side whole (blocks of fewer rows or columns)
    kr, kc = min(k, gray.shape[0]), min(k, gray.shape[1])
    h, w = (gray.shape[0] // kr) * kr, (gray.shape[1] // kc) * kc
    means = gray[:h, :w].astype(np.float32).reshape(h // kr, kr, w // kc, kc).mean(axis=(1, 3))
    return np.asarray(np.round(means), dtype=np.uint8), k
