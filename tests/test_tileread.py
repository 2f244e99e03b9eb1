"""The one tile reader (sarkit.raster.tileread): pixels per input kind, errors, and the same
pixels for the filter, the LLM image and the model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import sarkit, shared
from PIL import Image

from sarkit.errors import SarkitError
from sarkit.llm.image import read_gray as llm_read_gray
from sarkit.quality.features import load_tile
from sarkit.raster.tileread import (
    TileReadError,
    block_factor,
    block_mean,
    read_f32,
    read_u8,
    to_gray_u8,
)

UMBRA = ("scenes", "umbra_yasur", "umbra_mount_yasur.tiff")
OPERA = ("scenes", "opera_rtc_s1", "2021-11-19")


def _write(path: Path, data: np.ndarray, nodata: float | None = None) -> Path:
    data = data if data.ndim == 3 else data[None]
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0])
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", dtype=data.dtype, **profile) as ds:
        ds.write(data)
    return path


def _raw(path: Path) -> tuple[np.ndarray, float | None]:
    with rasterio.open(path) as src:
        return src.read(1), src.nodata


def _log_stretch(amplitude: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The documented rule, written out independently: 1 + 254 * clip of ln(amplitude)
    between the 1st and 99.5th percentile of the valid positive amplitude, 0 elsewhere."""
    a = amplitude.astype(np.float64)
    lo, hi = np.log(np.percentile(a[valid & (a > 0)], [1.0, 99.5]))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (np.log(np.maximum(a, 1e-30)) - lo) / (hi - lo)
    out = np.floor(1 + 254 * np.clip(np.nan_to_num(t), 0, 1)).astype(np.int32)
    out[~valid] = 0
    return out


def _close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal but for float32 rounding at level boundaries: never more than 1 apart, and
    almost every pixel exact."""
    diff = np.abs(got.astype(np.int32) - want)
    assert diff.max() <= 1
    assert (diff == 0).mean() > 0.99


@pytest.fixture(scope="module")
def sliced(tmp_path_factory) -> Path:
    """A tile as `sarkit slice` writes it (uint8, 0 = nodata) from the real Umbra scene."""
    out = tmp_path_factory.mktemp("slice")
    proc = sarkit("-q", "slice", shared(*UMBRA), "-o", out / "t", "-g", "500", check=0)
    return Path(json.loads(proc.stdout.splitlines()[0])["path"])


@pytest.fixture(scope="module")
def opera() -> Path:
    """A real OPERA RTC-S1 VH burst: float32 linear power (down to 1e-6), nodata tag NaN."""
    return sorted(shared(*OPERA).glob("*_VH.tif"))[0]


# --- uint8 ------------------------------------------------------------------------------


def test_slice_tile_pixels_as_written(sliced):
    raw, nodata = _raw(sliced)
    assert raw.dtype == np.uint8 and nodata == 0
    got = read_u8(sliced)
    assert got.dtype == np.uint8 and np.array_equal(got, raw)
    assert np.array_equal(read_f32(sliced), raw.astype(np.float32) / 255)


def test_untagged_uint8_product_keeps_its_zeros():
    """Umbra's zeros are dark speckle, no tag: kept as 0 (the filter's region rule decides)."""
    raw, nodata = _raw(shared(*UMBRA))
    assert nodata is None and (raw == 0).mean() > 0.2
    assert np.array_equal(read_u8(shared(*UMBRA)), raw)


def test_uint8_with_another_nodata_tag(tmp_path):
    data = np.array([[0, 1, 255], [7, 255, 0]], np.uint8).repeat(4, 0).repeat(4, 1)
    got = read_u8(_write(tmp_path / "t.tif", data, nodata=255))
    # tagged -> 0; a true 0 is data, so it becomes 1; the rest as they are
    want = np.array([[1, 1, 0], [7, 0, 1]], np.uint8).repeat(4, 0).repeat(4, 1)
    assert np.array_equal(got, want)


# --- other dtypes -----------------------------------------------------------------------


def test_opera_power_burst_log_stretched(opera):
    power, nodata = _raw(opera)
    assert power.dtype == np.float32 and math.isnan(nodata)
    got = read_u8(opera)
    valid = np.isfinite(power) & (power != 0)
    _close(got, _log_stretch(power, valid))
    assert got[valid].min() == 1 and got.max() == 255
    # the bulk of the burst spreads over the levels (a linear stretch leaves it black)
    p10, p90 = np.percentile(got[valid], [10, 90])
    assert p90 - p10 > 60
    # order preserved: brighter backscatter never reads darker
    order = np.argsort(power[valid], kind="stable")
    assert (np.diff(got[valid][order].astype(np.int32)) >= 0).all()


def test_opera_burst_with_nan_nodata(tmp_path, opera):
    power, _ = _raw(opera)
    holed = power.copy()
    holed[:30, :40] = np.nan
    path = _write(tmp_path / "holed.tif", holed, nodata=float("nan"))
    got = read_u8(path)
    assert (got[:30, :40] == 0).all()
    valid = np.isfinite(holed) & (holed != 0)
    assert (got[valid] >= 1).all()
    _close(got, _log_stretch(holed, valid))


def test_power_amplitude_and_db_of_one_burst_read_alike(tmp_path, opera):
    """Power, its amplitude and its dB are one measurement: they read as one image."""
    power, _ = _raw(opera)
    power = np.where(power > 0, power, np.float32(1e-7))  # dB needs a positive power
    from_power = read_u8(_write(tmp_path / "p.tif", power)).astype(np.int32)
    from_amp = read_u8(_write(tmp_path / "a.tif", np.sqrt(power))).astype(np.int32)
    db = (10 * np.log10(power)).astype(np.float32)
    assert (db < 0).all()
    from_db = read_u8(_write(tmp_path / "d.tif", db)).astype(np.int32)
    for other in (from_amp, from_db):
        diff = np.abs(other - from_power)
        assert diff.max() <= 2 and diff.mean() < 0.5


def test_float_db_with_negatives_stretched_linearly(tmp_path):
    rng = np.random.default_rng(3)
    db = rng.normal(-15.0, 4.0, (64, 64)).astype(np.float32)
    db[:8] += 25.0  # a bright band above 0 dB: a dB tile is not all negative
    got = read_u8(_write(tmp_path / "db.tif", db))
    lo, hi = np.percentile(db.astype(np.float64), [1.0, 99.5])
    want = np.floor(1 + 254 * np.clip((db - lo) / (hi - lo), 0, 1)).astype(np.int32)
    _close(got, want)
    assert got.min() == 1 and got.max() == 255  # 0 dB is data, not nodata


def test_uint16_amplitude_log_stretched_zero_border_is_nodata(tmp_path):
    rng = np.random.default_rng(5)
    amp = (np.sqrt(rng.gamma(1.0, 1.0, (64, 64))) * 300).astype(np.uint16)
    amp[:, :6] = 0  # a zero-filled border
    got = read_u8(_write(tmp_path / "u16.tif", amp))
    assert (got[:, :6] == 0).all()
    valid = amp != 0
    assert (got[valid] >= 1).all()
    _close(got, _log_stretch(amp, valid))
    # small DN values in a 16-bit file are stretched by the same rule, not clipped
    small = (amp // 100).astype(np.uint16)
    got_small = read_u8(_write(tmp_path / "small.tif", small))
    assert got_small.max() == 255 and got_small.max() > small.max()


def test_uint16_nodata_tag_honoured(tmp_path):
    data = np.full((16, 16), 900, np.uint16)
    data[8:] = 400
    data[:4] = 65535
    got = read_u8(_write(tmp_path / "t.tif", data, nodata=65535))
    assert (got[:4] == 0).all() and (got[4:8] == 255).all() and (got[8:] == 1).all()


@pytest.mark.parametrize("tag", [None, float("nan")])
def test_all_nan_tile_is_all_nodata(tmp_path, tag):
    path = _write(tmp_path / "nan.tif", np.full((20, 24), np.nan, np.float32), nodata=tag)
    got = read_u8(path)
    assert got.shape == (20, 24) and not got.any()
    assert not read_f32(path).any()


def test_constant_float_tile_reads_flat():
    got = to_gray_u8(np.full((8, 8), 0.25, np.float32))
    assert (got == got[0, 0]).all() and got[0, 0] >= 1


# --- chips ------------------------------------------------------------------------------


def test_mstar_jpeg_as_decoded():
    path = sorted(shared("mstar", "train", "0").glob("*.jpeg"))[0]
    with Image.open(path) as im:
        assert im.mode == "L"
        want = np.asarray(im)
    assert np.array_equal(read_u8(path), want)


def test_hrsid_rgb_jpeg_is_its_grey():
    path = sorted(shared("hrsid_mini", "images").glob("*.jpg"))[0]
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert np.array_equal(rgb[..., 0], rgb[..., 2])  # grey stored as RGB
    assert np.array_equal(read_u8(path), rgb[..., 0])


def test_polsf_pauli_png_equal_weight_mean():
    path = sorted(shared("polsf_airsar", "images").glob("*.png"))[0]
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB")).astype(np.int32)
        luma = np.asarray(im.convert("L")).astype(np.int32)
    got = read_u8(path)
    want = (rgb.sum(axis=-1) + 1) // 3
    assert np.array_equal(got, want)
    # not display luma, which would weight the volume (green) channel 0.59
    assert np.abs(got.astype(np.int32) - luma).mean() > 5


def test_png_alpha_zero_is_nodata(tmp_path):
    rgba = np.full((10, 10, 4), 90, np.uint8)
    rgba[..., 3] = 255
    rgba[:3, :, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    got = read_u8(tmp_path / "a.png")
    assert (got[:3] == 0).all() and (got[3:] == 90).all()


def test_sixteen_bit_png_stretched_like_a_geotiff(tmp_path):
    amp = np.sqrt(np.random.default_rng(2).gamma(1.0, 1.0, (32, 32))) * 900 + 1
    amp = amp.astype(np.uint16)
    Image.fromarray(amp).save(tmp_path / "a.png")
    assert np.array_equal(read_u8(tmp_path / "a.png"), read_u8(_write(tmp_path / "a.tif", amp)))


# --- decimation -------------------------------------------------------------------------


def test_block_mean_keeps_zero_speckle():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 40, (100, 90)).astype(np.uint8)
    gray[gray < 10] = 0  # a quarter zeros, scattered: dark speckle
    gray[:20, :20] = 0  # one all-zero corner
    got, k = block_mean(gray, 30)
    assert k == block_factor(gray.shape, 30) == 4
    want = gray[:100, :88].reshape(25, 4, 22, 4).astype(np.float64).mean(axis=(1, 3))
    assert got.shape == (25, 22) and np.array_equal(got, np.round(want).astype(np.uint8))
    assert (got[:5, :5] == 0).all() and (got[5:] > 0).mean() > 0.95


def test_block_mean_of_a_thin_strip_and_small_tiles():
    strip, k = block_mean(np.full((3, 400), 50, np.uint8), 100)
    assert k == 4 and strip.shape == (1, 100) and (strip == 50).all()
    small = np.arange(12, dtype=np.uint8).reshape(3, 4)
    same, k1 = block_mean(small, 1024)
    assert k1 == 1 and same is small


def test_decimated_readers_agree(sliced):
    full = read_u8(sliced)
    small = read_u8(sliced, max_side=200)
    assert max(small.shape) <= 200
    assert np.array_equal(small, block_mean(full, 200)[0])
    assert np.array_equal(read_f32(sliced, 200), small.astype(np.float32) / 255)


# --- errors -----------------------------------------------------------------------------


def _error(path: Path) -> str:
    with pytest.raises(SarkitError) as info:
        read_u8(path)
    assert isinstance(info.value, TileReadError)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_errors_name_the_path_and_the_problem(tmp_path, sliced):
    assert "not found" in _error(tmp_path / "missing.tif")
    (tmp_path / "dir.tif").mkdir()
    assert "folder" in _error(tmp_path / "dir.tif")
    (tmp_path / "empty.tif").write_bytes(b"")
    assert "empty" in _error(tmp_path / "empty.tif")
    (tmp_path / "notes.tif").write_text("not pixels\n" * 20)
    assert "not a raster" in _error(tmp_path / "notes.tif")
    data = sliced.read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(tmp_path / "cut.tif")
    jpeg = sorted(shared("mstar", "train", "0").glob("*.jpeg"))[0].read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(jpeg[: len(jpeg) // 2])
    assert "truncated" in _error(tmp_path / "cut.jpeg")


def test_filter_llm_and_model_report_the_same_error(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    messages = set()
    for reader in (load_tile, read_f32):
        with pytest.raises(TileReadError, match="empty") as info:
            reader(path)
        messages.add(str(info.value))
    # the LLM's reader raises the same error; the caption chain fails that tile alone
    with pytest.raises(TileReadError) as info:
        llm_read_gray(str(path))
    messages.add(str(info.value))
    assert len(messages) == 1


# --- one tile, one set of pixels ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["slice", "opera", "polsf", "hrsid"])
def test_filter_llm_and_model_see_the_same_pixels(kind, sliced, opera):
    path = {
        "slice": lambda: sliced,
        "opera": lambda: opera,
        "polsf": lambda: sorted(shared("polsf_airsar", "images").glob("*.png"))[0],
        "hrsid": lambda: sorted(shared("hrsid_mini", "images").glob("*.jpg"))[0],
    }[kind]()
    pixels = read_u8(path)
    filter_pixels = load_tile(path).pixels
    llm_pixels, factor = llm_read_gray(str(path), max_side=4096)
    model_pixels = read_f32(path)
    assert factor == 1.0
    assert np.array_equal(filter_pixels, pixels)
    assert np.array_equal(llm_pixels, pixels)
    assert model_pixels.dtype == np.float32
    assert 0.0 <= model_pixels.min() and model_pixels.max() <= 1.0
    assert np.array_equal(np.round(model_pixels * 255).astype(np.uint8), pixels)
    # the LLM's decimated view is a block mean of the very pixels the filter measured
    llm_small, k = llm_read_gray(str(path), max_side=64)
    assert np.array_equal(llm_small, block_mean(filter_pixels, 64)[0]) and k > 1
