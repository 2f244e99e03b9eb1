"""Quantising uncompressed GeoTIFF tiles in place: the same bytes as reading them through
GDAL, and GDAL wherever the bytes on disk are not plainly the pixels."""

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasters import speckle

from sarkit.raster import quantise
from sarkit.raster.mapped import MappedBand
from sarkit.raster.prefetch import BlockIndex

pytestmark = pytest.mark.skipif(quantise._lut is None, reason="the C kernel was not built here")


def scene(path, data, **options):
    data = data if data.ndim == 3 else data[None]
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=len(data))
    with rasterio.open(path, "w", dtype=data.dtype, **profile, **options) as ds:
        ds.write(data)
    return path


def probe(path, band=1):
    with rasterio.open(path) as ds:
        return MappedBand.probe(ds, band, BlockIndex.read(ds, band))


def table(dtype):
    rng = np.random.default_rng(0)
    size = (
        1 << (32 - quantise.FLOAT_SHIFT)
        if dtype == "float32"
        else 1 << (8 * np.dtype(dtype).itemsize)
    )
    return rng.integers(0, 256, size).astype(np.uint8)


CASES = {
    "float32 tiled": (
        speckle((600, 520), seed=1),
        dict(tiled=True, blockxsize=256, blockysize=256),
    ),
    "int16 striped": ((speckle((300, 333), seed=2) * 900).astype(np.int16), dict(blockysize=7)),
    "uint16 tiled": (
        (speckle((300, 300), seed=3) * 900).astype(np.uint16),
        dict(tiled=True, blockxsize=64, blockysize=32),
    ),
    "uint8 striped": ((speckle((90, 70), seed=4) * 60).astype(np.uint8), {}),
}


@pytest.mark.parametrize("case", CASES)
def test_in_place_bytes_equal_a_gdal_read(tmp_path, case):
    data, options = CASES[case]
    path = scene(tmp_path / "s.tif", data, **options)
    band = probe(path)
    assert band is not None
    lut = table(data.dtype.name)
    h, w = data.shape
    windows = [
        (0, 0, w, h),
        (0, 0, w // 3, h // 2),
        (w // 5, h // 7, w // 2, h // 3),
        (w - 37, h - 19, 37, 19),
        (w // 2, 0, 1, h),
    ]
    for col, row, width, height in windows:
        got = band.gather(col, row, width, height, lut)
        expected, zeros = quantise.gather(
            np.ascontiguousarray(data[row : row + height, col : col + width]), lut
        )
        assert got is not None and np.array_equal(got[0], expected) and got[1] == zeros
    assert band.gather(w - 10, 0, 20, 5, lut) is None  # over the edge: GDAL pads it
    band.close()


def test_gdal_reads_what_is_not_plain_pixels(tmp_path):
    data = speckle((64, 64), seed=5)
    assert probe(scene(tmp_path / "z.tif", data, compress="deflate")) is None
    assert probe(scene(tmp_path / "be.tif", data, ENDIANNESS="BIG")) is None
    two = np.stack([data, data])
    assert probe(scene(tmp_path / "pix.tif", two, interleave="pixel")) is None
    assert probe(scene(tmp_path / "band.tif", two, interleave="band"), band=2) is not None
    assert probe(scene(tmp_path / "f64.tif", data.astype(np.float64))) is None  # no table
    cut = scene(tmp_path / "cut.tif", data, tiled=True, blockxsize=16, blockysize=16)
    Path(cut).write_bytes(Path(cut).read_bytes()[:-100])  # truncated: GDAL's error, not a fault
    assert probe(cut) is None


def tiled_scene(path, data, block):
    """A georeferenced, uncompressed, block-tiled scene."""
    utm = dict(crs="EPSG:32651", transform=rasterio.Affine(2, 0, 350000, 0, -2, 3460000))
    return scene(path, data, tiled=True, blockxsize=block, blockysize=block, **utm)


def sliced(path, out, sizes):
    """Each tile's file bytes by record id, from an in-process one-worker slice."""
    from sarkit.raster.slicer import SliceOptions, slice_scene
    from sarkit.report import Report

    options = SliceOptions(out_dir=out, ground_sizes=sizes, workers=1)
    return {
        r["id"]: Path(r["path"]).read_bytes() for r in slice_scene(path, options, Report("slice"))
    }


def test_slicing_in_place_writes_the_same_tiles(tmp_path, monkeypatch):
    data = speckle((700, 650), seed=6)
    data[:40, :] = 0.0  # a zero border: those tiles take the exact path
    data[300, 310] = data[500, 100] = 0.0  # isolated zeros: signal, screened by a second table
    data[520, 120] = np.nan  # beside one of them: this tile still takes the exact path
    path = tiled_scene(tmp_path / "s.tif", data, 256)
    in_place = sliced(path, tmp_path / "a", [600.0, 200.0])
    monkeypatch.setattr(MappedBand, "probe", classmethod(lambda cls, *a: None))
    through_gdal = sliced(path, tmp_path / "b", [600.0, 200.0])
    assert len(in_place) > 10 and in_place == through_gdal


def test_without_the_c_kernel_slicing_writes_the_same_tiles(tmp_path, monkeypatch):
    """A machine with no C compiler at install time gets numpy's path: the same bytes."""
    data = (speckle((300, 280), seed=9) * 500).astype(np.int16)
    data[:, :30] = 0
    path = tiled_scene(tmp_path / "s.tif", data, 64)
    compiled = sliced(path, tmp_path / "a", [200.0])
    monkeypatch.setattr(quantise, "_lut", None)
    assert sliced(path, tmp_path / "b", [200.0]) == compiled and len(compiled) >= 4
