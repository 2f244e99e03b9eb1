import json

import numpy as np
import pytest
import rasterio
from conftest import sarkit, shared
from rasterio.warp import transform as warp_transform
from rasters import gcps_for, speckle, write

TANNA = {"lon": (169.18, 169.52), "lat": (-19.70, -19.30)}  # Tanna Island's bounding box


def records(text):
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def umbra_geo(tmp_path_factory):
    scene = shared("scenes", "umbra_yasur", "umbra_mount_yasur.tiff")
    out = tmp_path_factory.mktemp("umbra")
    tiles = sarkit("slice", scene, "-o", out / "t", "-g", "500,250", check=0).stdout
    proc = sarkit("georef", "--geojson", out / "fp.geojson", input=tiles, check=0)
    return scene, records(proc.stdout), out / "fp.geojson", records(tiles)


def test_umbra_is_on_tanna_vanuatu(umbra_geo):
    _, recs, _, _ = umbra_geo
    for rec in recs:
        lon, lat = rec["geo"]["center"]
        assert TANNA["lon"][0] < lon < TANNA["lon"][1] and TANNA["lat"][0] < lat < TANNA["lat"][1]
        place = rec["geo"]["place"]
        assert place["country"] == "VU" and place["admin1"] == "Tafea"
        assert place["name"] and 0 < place["distance_km"] < 50


def test_footprints_map_back_onto_scene_pixels(umbra_geo):
    scene, recs, _, _ = umbra_geo
    with rasterio.open(scene) as ds:
        inverse = ~ds.transform
        crs = ds.crs
    for rec in recs:
        ring = rec["geo"]["footprint"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        xs, ys = warp_transform("EPSG:4326", crs, [p[0] for p in ring], [p[1] for p in ring])
        pixels = [inverse @ (x, y) for x, y in zip(xs, ys, strict=True)]
        c, r, w, h = rec["window"]
        expected = [(c, r), (c + w, r), (c + w, r + h), (c, r + h), (c, r)]
        assert np.allclose(pixels, expected, atol=0.01), rec["id"]


def test_records_pass_through_untouched(umbra_geo):
    _, recs, _, tiles = umbra_geo
    assert len(recs) == len(tiles)
    for before, after in zip(tiles, recs, strict=True):
        assert {k: v for k, v in after.items() if k != "geo"} == before


def test_geojson_feature_collection(umbra_geo):
    _, recs, geojson, _ = umbra_geo
    doc = json.loads(geojson.read_text())
    assert doc["type"] == "FeatureCollection"
    assert [f["properties"]["id"] for f in doc["features"]] == [r["id"] for r in recs]
    assert doc["features"][0]["geometry"]["type"] == "Polygon"


def test_gcp_only_tiles(tmp_path):
    scene = write(tmp_path / "gcp.tif", speckle((80, 100)), gcps=gcps_for(100, 80))
    tiles = sarkit("slice", scene, "-o", tmp_path / "t", "-g", "200", check=0).stdout
    (rec,) = records(sarkit("georef", input=tiles, check=0).stdout)[:1]
    lon, lat = rec["geo"]["center"]
    assert 120.99 < lon < 121.02 and 30.99 < lat < 31.01
    assert rec["geo"]["place"]["country"] == "CN"


def test_ungeoreferenced_tile_is_reported_and_skipped(tmp_path):
    good = write(tmp_path / "good.tif", speckle((8, 8)))
    plain = write(tmp_path / "plain.tif", speckle((8, 8)), crs=None)
    lines = [
        json.dumps({"id": "a", "path": str(good)}),
        json.dumps({"id": "b", "path": str(plain)}),
        json.dumps({"id": "c"}),
        json.dumps({"id": "d", "path": str(tmp_path / "gone.tif")}),
        json.dumps({"id": "e", "path": str(good)}),
    ]
    proc = sarkit("georef", input="\n".join(lines) + "\n")
    assert proc.returncode == 1
    assert [r["id"] for r in records(proc.stdout)] == ["a", "e"]
    assert "<stdin>:2: b: tile" in proc.stderr and "has no georeferencing" in proc.stderr
    assert "<stdin>:3 (c): record is missing key 'path'" in proc.stderr
    assert "<stdin>:4: d: tile file" in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_output_file_is_written_atomically(tmp_path):
    good = write(tmp_path / "good.tif", speckle((8, 8)))
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "path": str(good)}) + "\n")
    out = tmp_path / "out.jsonl"
    sarkit("georef", src, "-o", out, check=0)
    assert records(out.read_text())[0]["geo"]["place"]["country"] == "CN"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.tif", "in.jsonl", "out.jsonl"]
