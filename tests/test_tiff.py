"""The tile encoder's GeoTIFFs read back in GDAL exactly like the ones GDAL writes itself."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from sarkit.raster.tiff import TileEncoder, read_tags

TAGS = {"SARKIT_SCENE": "/data/scene α.tif", "SARKIT_SENSOR": "umbra"}
CASES = [
    # crs, transform, (height, width)
    ("EPSG:32651", Affine(1.0, 0, 350000, 0, -1.0, 3470000), (1024, 1024)),  # north-up
    ("EPSG:32759", Affine(0.14, 0.58, 337000, 0.58, -0.14, 7840000), (700, 300)),  # rotated
    ("EPSG:4326", Affine(1e-4, 0, 169.3, 0, -1e-4, -19.5), (100, 50)),  # small: one strip
    (CRS.from_proj4("+proj=stere +lat_0=90 +lon_0=-45 +k=0.994 +datum=WGS84").to_wkt(),
     Affine(10, 0, 0, 0, -10, 0), (257, 513)),  # no EPSG code; padded edge blocks
    (None, None, (300, 260)),  # no georeferencing (a scene sliced with --pixel-size)
]  # fmt: skip


@pytest.mark.parametrize("compress", ["zstd", "none"])
@pytest.mark.parametrize(("crs", "transform", "shape"), CASES)
def test_encoded_tile_reads_back_like_gdal(tmp_path, crs, transform, shape, compress):
    pixels = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "t.tif"
    path.write_bytes(b"".join(TileEncoder(crs, 0, TAGS, compress).encode(pixels, transform)))
    with rasterio.open(path) as ds:
        assert (ds.count, ds.dtypes[0], ds.shape) == (1, "uint8", shape)
        assert np.array_equal(ds.read(1), pixels)
        assert ds.nodata == 0
        assert {k: ds.tags()[k] for k in TAGS} == TAGS
        assert (ds.compression.name if ds.compression else "none") == compress
        if crs is None:
            assert ds.crs is None
        else:
            assert ds.crs == CRS.from_user_input(crs)
            assert ds.transform.almost_equals(transform, precision=1e-12)
        tiled = min(shape) >= 256
        assert ds.block_shapes[0] == ((256, 256) if tiled else shape)


def test_rotated_tile_uses_the_model_transformation(tmp_path):
    pixels = np.ones((256, 256), np.uint8)
    enc = TileEncoder("EPSG:32759", 0, {}, "zstd")
    rotated = read_tags(b"".join(enc.encode(pixels, Affine(0.1, 0.5, 3e5, 0.5, -0.1, 7e6))))
    north_up = read_tags(b"".join(enc.encode(pixels, Affine(1, 0, 3e5, 0, -1, 7e6))))
    assert 34264 in rotated and 33550 not in rotated
    assert 33550 in north_up and 33922 in north_up and 34264 not in north_up


def test_only_what_the_encoder_writes_skips_gdal():
    assert TileEncoder.supports("zstd", 1024 * 1024)
    assert TileEncoder.supports("none", 5120 * 5120)
    assert not TileEncoder.supports("deflate", 1024)  # GDAL's libdeflate is faster
    assert not TileEncoder.supports("lzw", 1024)
    assert not TileEncoder.supports("zstd", 40000 * 40000)  # past classic TIFF's 4 GiB
