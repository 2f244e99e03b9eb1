"""Prefetching a tile's blocks: the byte runs must be exactly the window's blocks."""

import os

import numpy as np
import pytest
import rasterio
from rasters import speckle

from sarkit.raster.prefetch import BlockIndex, Prefetcher


def scene(path, data, **options):
    profile = dict(driver="GTiff", width=data.shape[1], height=data.shape[0], count=1)
    with rasterio.open(path, "w", dtype=data.dtype, **profile, **options) as ds:
        ds.write(data, 1)
    return path


def bytes_of(path, runs):
    with open(path, "rb") as fh:
        return b"".join(os.pread(fh.fileno(), length, offset) for offset, length in runs)


def test_tiled_runs_hold_the_window_blocks(tmp_path):
    data = speckle((600, 520), seed=1)
    path = scene(tmp_path / "t.tif", data, tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path) as ds:
        index = BlockIndex.read(ds, 1)
    runs = index.ranges(256, 0, 256, 512)  # block column 1, block rows 0 and 1
    raw = np.frombuffer(bytes_of(path, runs), np.float32).reshape(2, 256, 256)
    assert np.array_equal(raw[0], data[:256, 256:512])
    assert np.array_equal(raw[1], data[256:512, 256:512])
    # a whole block row is one run (GDAL writes blocks in row order), edges included
    whole = index.ranges(0, 0, 520, 100)
    assert len(whole) == 1 and whole[0][1] == 3 * 256 * 256 * 4
    # a window hanging over the scene edge asks for what exists only
    assert sum(n for _, n in index.ranges(515, 590, 100, 100)) == 256 * 256 * 4


def test_strips_and_compressed_blocks(tmp_path):
    data = (speckle((64, 40), seed=2) * 1000).astype(np.int16)
    striped = scene(tmp_path / "s.tif", data, blockysize=8)
    with rasterio.open(striped) as ds:
        index = BlockIndex.read(ds, 1)
    raw = np.frombuffer(bytes_of(striped, index.ranges(10, 16, 5, 16)), np.int16)
    assert np.array_equal(raw.reshape(16, 40), data[16:32])
    packed = scene(
        tmp_path / "z.tif", data, tiled=True, blockxsize=16, blockysize=16, compress="deflate"
    )
    with rasterio.open(packed) as ds:
        index = BlockIndex.read(ds, 1)
        sizes = [int(ds.get_tag_item(f"BLOCK_SIZE_{c}_0", "TIFF", bidx=1)) for c in range(3)]
    assert sum(n for _, n in index.ranges(0, 0, 40, 16)) == sum(sizes)


def test_other_formats_are_not_prefetched(tmp_path):
    path = tmp_path / "scene.img"
    with rasterio.open(path, "w", driver="HFA", width=8, height=8, count=1, dtype="uint8") as ds:
        ds.write(np.ones((1, 8, 8), np.uint8))
    with rasterio.open(path) as ds:
        assert BlockIndex.read(ds, 1) is None


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_prefetcher_advises_and_stops(tmp_path):
    data = speckle((512, 512), seed=3)
    path = scene(tmp_path / "t.tif", data, tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path) as ds:
        prefetch = Prefetcher(path, BlockIndex.read(ds, 1))
    for window in [(0, 0, 256, 256), (256, 256, 256, 256), (10_000, 0, 5, 5)]:
        prefetch.want(window)
    prefetch.close()
    assert not prefetch.thread.is_alive()
