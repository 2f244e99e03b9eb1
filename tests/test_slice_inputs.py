"""slice on inputs that used to give wrong tiles with exit 0: reruns, dB scenes, flat scenes."""

import json
import os

import numpy as np
import pytest
import rasterio
from conftest import sarkit, shared
from rasters import speckle, write


def records(proc):
    return [json.loads(line) for line in proc.stdout.splitlines()]


def tile_facts(rec):
    with rasterio.open(rec["path"]) as tile:
        return tile.width, tile.height, tile.tags()


# ---------------------------------------------------------------- reuse of earlier tiles


def test_rerun_with_other_ground_size_or_quantiser_rewrites_the_tiles(tmp_path):
    scene = write(tmp_path / "s.tif", speckle((128, 128)))  # 2 m pixels
    out = tmp_path / "t"
    first = records(sarkit("slice", scene, "-o", out, "-g", "128", check=0))
    assert {tile_facts(r)[:2] for r in first} == {(64, 64)}
    # same names (s/L/r000_c000.tif ...), other windows: the tiles must follow the records
    second = sarkit("slice", scene, "-o", out, "-g", "64", check=0)
    assert "reused" not in second.stderr
    for rec in records(second):
        width, height, _ = tile_facts(rec)
        assert [width, height] == rec["window"][2:] == [32, 32]
    third = sarkit("slice", scene, "-o", out, "-g", "64", "--quantiser", "sigma-clip", check=0)
    assert "reused" not in third.stderr
    for rec in records(third):
        assert rec["quantiser"]["name"] == "sigma-clip"
        assert tile_facts(rec)[2]["SARKIT_QUANTISER"] == "sigma-clip"
    again = sarkit("slice", scene, "-o", out, "-g", "64", "--quantiser", "sigma-clip", check=0)
    assert "reused (already written)" in again.stderr and records(again) == records(third)


def test_a_changed_scene_file_gets_new_tiles(tmp_path):
    scene = write(tmp_path / "s.tif", speckle((64, 64), seed=1))
    first = records(sarkit("slice", scene, "-o", tmp_path / "t", "-g", "64", check=0))
    with rasterio.open(first[0]["path"]) as tile:
        before = tile.read(1)
    write(scene, speckle((64, 64), seed=2) * 3)  # same path, another product
    second = sarkit("slice", scene, "-o", tmp_path / "t", "-g", "64", check=0)
    assert "reused" not in second.stderr
    with rasterio.open(records(second)[0]["path"]) as tile:
        assert not np.array_equal(tile.read(1), before)


def test_two_scenes_of_one_file_name_never_share_tiles(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write(tmp_path / "a" / "scene.tif", speckle((64, 64), seed=1))
    b = write(tmp_path / "b" / "scene.tif", speckle((64, 64), seed=2))
    out = tmp_path / "t"
    first = records(sarkit("slice", a, "-o", out, "-g", "64", check=0))
    stamps = {r["path"]: os.stat(r["path"]).st_mtime_ns for r in first}
    # another run: refused, naming both scenes; the first scene's tiles are untouched
    proc = sarkit("slice", b, "-o", out, "-g", "64", check=1)
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert str(b) in proc.stderr and str(a.resolve()) in proc.stderr
    assert "--overwrite" in proc.stderr
    assert all(os.stat(p).st_mtime_ns == m for p, m in stamps.items())
    # --overwrite hands the folder to the new scene and rewrites its tiles
    moved = records(sarkit("slice", b, "-o", out, "-g", "64", "--overwrite", check=0))
    assert {tile_facts(r)[2]["SARKIT_SCENE"] for r in moved} == {str(b)}
    # one run with both: the second is refused even with --overwrite, the first is sliced
    both = sarkit("slice", a, b, "-o", tmp_path / "u", "-g", "64", "--overwrite", check=1)
    assert {r["scene"] for r in records(both)} == {str(a)}
    assert "two scenes of this run have the same file name" in both.stderr


# ---------------------------------------------------------------- radiometry


def db_scene(path, **tags):
    """A Sentinel-1 GRD in dB as SNAP/pyroSAR write it: float32, -23 to -4 dB, 0 fill."""
    power = speckle((96, 96), seed=3) ** 2 * 0.05
    db = np.clip(10 * np.log10(np.maximum(power, 1e-6)), -23, -4).astype(np.float32)
    db[:, :8] = 0.0  # zero-filled border, no nodata tag
    return write(path, db, tags=tags or None)


def test_a_db_scene_is_found_by_its_values_with_auto(tmp_path):
    scene = db_scene(tmp_path / "S1A_IW_GRDH_1SDV_20230101_VV_db.tif")
    proc = sarkit("slice", scene, "-o", tmp_path / "t", "-g", "64", check=0)
    recs = records(proc)
    assert recs and all(r["sensor"] == "sentinel1" and r["radiometry"] == "db" for r in recs)
    assert "negative" in recs[0]["radiometry_reason"]
    assert f"{scene}: radiometry db" in proc.stderr
    with rasterio.open(recs[0]["path"]) as tile:
        pixels = tile.read(1)
    assert pixels.std() > 20 and len(np.unique(pixels)) > 100  # not the constant 1


def test_real_opera_burst_written_in_db_gives_the_same_tiles_as_its_power(tmp_path):
    """A real OPERA RTC-S1 burst (linear power), converted to dB as SNAP would write it:
    auto must find dB from the values, and the tiles must match the power scene's."""
    folder = shared("scenes", "opera_rtc_s1", "2021-11-19")
    power = sorted(folder.glob("*T137-292318-IW1*_VV.tif"))[0]
    with rasterio.open(power) as src:
        profile, values = src.profile, src.read(1)
    db = tmp_path / power.name.replace(".tif", "_db.tif")
    with np.errstate(divide="ignore", invalid="ignore"):
        in_db = (10 * np.log10(values)).astype(np.float32)
    with rasterio.open(db, "w", **profile) as dst:
        dst.write(in_db, 1)
    got = records(sarkit("slice", db, "-o", tmp_path / "a", "-g", "1500", check=0))
    ref = records(sarkit("slice", power, "-o", tmp_path / "b", "-g", "1500", check=0))
    assert {r["radiometry"] for r in got} == {"db"} and len(got) == len(ref) == 4
    for a, b in zip(got, ref, strict=True):
        with rasterio.open(a["path"]) as ta, rasterio.open(b["path"]) as tb:
            pa, pb = ta.read(1).astype(int), tb.read(1).astype(int)
        assert pa.std() > 10 and np.abs(pa - pb).max() <= 1  # the same stretch, within a level


def test_a_declared_radiometry_the_data_contradicts_is_an_error(tmp_path):
    scene = db_scene(tmp_path / "S1A_IW_GRDH_1SDV_20230101_VV.tif")
    proc = sarkit("slice", scene, "-o", tmp_path / "t", "-g", "64", "--radiometry", "power")
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert f"{scene}: --radiometry power" in proc.stderr and "--radiometry db" in proc.stderr
    dn = write(tmp_path / "dn.tif", (speckle((64, 64)) * 3000).astype(np.uint16))
    proc = sarkit("slice", dn, "-o", tmp_path / "t", "-g", "64", "--radiometry", "db")
    assert proc.returncode == 1 and f"{dn}: --radiometry db" in proc.stderr


def test_band_unit_says_db(tmp_path):
    path = tmp_path / "positive.tif"
    values = (3 + 10 * speckle((64, 64), seed=4)).astype(np.float32)  # 3..30 dB: no negatives
    write(path, values)
    with rasterio.open(path, "r+") as ds:
        ds.units = ("dB",)
    (rec, *_) = records(sarkit("slice", path, "-o", tmp_path / "t", "-g", "64", check=0))
    assert rec["radiometry"] == "db" and "unit" in rec["radiometry_reason"]


@pytest.mark.parametrize("radiometry", ["auto", "amplitude"])
def test_a_scene_that_quantises_to_a_constant_is_named_not_passed_on(tmp_path, radiometry):
    flat = write(tmp_path / "flat.tif", np.full((64, 64), 7.0, np.float32))
    good = write(tmp_path / "good.tif", speckle((64, 64)))
    proc = sarkit("slice", flat, good, "-o", tmp_path / "t", "-g", "64", "--radiometry", radiometry)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert {r["scene"] for r in records(proc)} == {str(good)}
    assert f"{flat}: its tiles would be nearly constant" in proc.stderr
