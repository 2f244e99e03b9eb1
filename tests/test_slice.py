import json
import math
import multiprocessing
import os
import signal

import numpy as np
import pytest
import rasterio
from conftest import sarkit, shared
from rasters import gcps_for, speckle, write

from sarkit.raster.slicer import _work as _REAL_WORK
from sarkit.raster.windows import plan


def records(proc):
    return [json.loads(line) for line in proc.stdout.splitlines()]


# ---------------------------------------------------------------- windows (pure)


def test_nested_scales_parent_contains_child():
    tiles, dropped = plan(1000, 1000, [(400, 400), (100, 100), (25, 25)])
    assert dropped == 5  # a 3x3 grid of L cells: 4 whole, 5 reaching past the edge
    by_index = dict(enumerate(tiles))
    for spec in tiles:
        if spec.parent is None:
            assert spec.scale == "L"
            continue
        parent = by_index[spec.parent]
        assert parent.level == spec.level - 1
        assert parent.col_off <= spec.col_off
        assert spec.col_off + spec.width <= parent.col_off + parent.width
        assert parent.row_off <= spec.row_off
        assert spec.row_off + spec.height <= parent.row_off + parent.height
    assert [t.scale for t in tiles].count("M") == 4 * 16
    assert [t.scale for t in tiles].count("S") == 4 * 16 * 16
    # depth first: every parent comes before its children
    assert all(t.parent is None or t.parent < i for i, t in enumerate(tiles))


def test_partial_tiles_kept_above_coverage():
    tiles, dropped = plan(10, 10, [(4, 4)], keep_partial=True, min_coverage=0.5)
    assert all(t.coverage >= 0.5 for t in tiles)
    assert len(tiles) == 8 and dropped == 1


# ---------------------------------------------------------------- real scenes


def test_umbra_rotated_scene_src_windows(tmp_path):
    scene = shared("scenes", "umbra_yasur", "umbra_mount_yasur.tiff")
    proc = sarkit("slice", scene, "-o", tmp_path / "t", "-g", "500,250", check=0)
    recs = records(proc)
    with rasterio.open(scene) as ds:
        t = ds.transform
    pixel = math.hypot(t.a, t.d)  # rotated: the column vector's length, not t.a
    assert pixel == pytest.approx(0.5942, abs=1e-3)
    large = [r for r in recs if r["scale"] == "L"]
    assert large and all(r["window"][2] == round(500 / pixel) for r in large)
    assert all(r["sensor"] == "umbra" and r["band"] == "X" for r in recs)
    assert all(r["crs"] == "EPSG:32759" for r in recs)
    first = large[0]
    with rasterio.open(first["path"]) as tile:
        assert tile.dtypes[0] == "uint8" and tile.nodata == 0
        assert tile.crs.to_string() == "EPSG:32759"
        # rotation kept: the tile's transform is the scene's, moved to the window
        expected = t @ rasterio.Affine.translation(*first["window"][:2])
        assert tile.transform.almost_equals(expected)
        assert tile.profile.get("compress", "").lower() == "zstd"
        assert tile.profile.get("tiled") and tile.block_shapes[0] == (256, 256)
        # 8-bit input passes through unchanged (dark speckle zeros become 1, not nodata)
        c, r, w, h = first["window"]
        original = rasterio.open(scene).read(1, window=((r, r + h), (c, c + w)))
        assert np.array_equal(np.maximum(original, 1), tile.read(1))
    # the scene's zeros are dark speckle, not a fill border: nothing is called nodata
    assert max(r["nodata_frac"] for r in recs) < 0.01
    for rec in recs:
        if rec["scale"] == "M":
            assert rec["parent"].split("/")[1] == "L"


def test_opera_power_vv_vh(tmp_path):
    folder = shared("scenes", "opera_rtc_s1", "2021-11-19")
    scenes = sorted(folder.glob("*T137-292318-IW1*.tif"))
    assert len(scenes) == 2
    proc = sarkit("slice", *scenes, "-o", tmp_path / "t", "-g", "1500", check=0)
    recs = records(proc)
    assert {r["polarization"] for r in recs} == {"VV", "VH"}
    assert all(r["sensor"] == "sentinel1" and r["radiometry"] == "power" for r in recs)
    assert all(r["window"][2:] == [50, 50] and r["pixel_m"] == 30.0 for r in recs)
    vv = [r for r in recs if r["polarization"] == "VV"]
    assert len(vv) == 4
    # one quantiser fit per scene: neighbouring tiles share it
    assert len({json.dumps(r["quantiser"]) for r in vv}) == 1
    with rasterio.open(vv[0]["path"]) as tile:
        pixels = tile.read(1)
    assert pixels.min() >= 1 and pixels.std() > 10, "power must be stretched, not crushed"


# ---------------------------------------------------------------- edge cases


def test_int16_complex_and_bands(tmp_path):
    rng = np.random.default_rng(1)
    slc = (rng.normal(size=(2, 64, 64)) + 1j * rng.normal(size=(2, 64, 64))).astype(np.complex64)
    cfile = write(tmp_path / "slc.tif", slc, descriptions=["HH", "HV"])
    proc = sarkit("slice", cfile, "-o", tmp_path / "t", "-g", "128", "--band", "HV", check=0)
    (rec,) = records(proc)
    assert rec["polarization"] == "HV" and rec["band_index"] == 2
    with rasterio.open(rec["path"]) as tile:
        assert tile.dtypes[0] == "uint8" and tile.read(1).std() > 5
    ifile = write(tmp_path / "i16.tif", (speckle((64, 64)) * 1000).astype(np.int16))
    (rec,) = records(sarkit("slice", ifile, "-o", tmp_path / "t", "-g", "32,16", "-q", check=0))[:1]
    assert rec["window"] == [0, 0, 16, 16] and rec["pixel_m"] == 2.0


def test_gcp_only_scene(tmp_path):
    scene = write(tmp_path / "gcp.tif", speckle((80, 100)), gcps=gcps_for(100, 80))
    recs = records(sarkit("slice", scene, "-o", tmp_path / "t", "-g", "200", check=0))
    assert recs and all(r["georef"] == "gcps" for r in recs)
    with rasterio.open(recs[0]["path"]) as tile:
        gcps, crs = tile.gcps
        assert len(gcps) == 4 and crs.to_epsg() == 4326


@pytest.mark.parametrize(("fill", "tag"), [(np.nan, np.nan), (0.0, None)])
def test_all_nodata_scene_is_named_and_fails(tmp_path, fill, tag):
    """All NaN, or all zero with no nodata tag (a zero fill): no tile, and the scene named."""
    scene = write(tmp_path / "empty.tif", np.full((40, 40), fill, np.float32), nodata=tag)
    good = write(tmp_path / "good.tif", speckle((40, 40)))
    proc = sarkit("slice", scene, good, "-o", tmp_path / "t", "-g", "40", check=1)
    assert {r["scene"] for r in records(proc)} == {str(good)}
    assert "mostly nodata" in proc.stderr
    assert f"{scene}: every tile was nodata" in proc.stderr and "Traceback" not in proc.stderr


def test_one_pixel_scene(tmp_path):
    scene = write(tmp_path / "one.tif", np.array([[5.0]], np.float32))
    (rec,) = records(sarkit("slice", scene, "-o", tmp_path / "t", "-g", "2", check=0))
    assert rec["window"] == [0, 0, 1, 1]


def test_no_crs_needs_pixel_size(tmp_path):
    scene = write(tmp_path / "plain.tif", speckle((32, 32)), crs=None)
    proc = sarkit("slice", scene, "-o", tmp_path / "t", "-g", "16")
    assert proc.returncode == 1 and "has no georeferencing" in proc.stderr
    assert str(scene) in proc.stderr and "Traceback" not in proc.stderr
    recs = records(
        sarkit("slice", scene, "-o", tmp_path / "t", "-g", "16", "--pixel-size", "1", check=0)
    )
    assert len(recs) == 4 and recs[0]["crs"] is None and recs[0]["transform"] is None


@pytest.mark.parametrize(
    ("ground", "message"),
    [("0.5", "smaller than a pixel"), ("1000", "but the scene is 32x32 px")],
)
def test_bad_ground_sizes(tmp_path, ground, message):
    scene = write(tmp_path / "s.tif", speckle((32, 32)))
    proc = sarkit("slice", scene, "-o", tmp_path / "t", "-g", ground)
    assert proc.returncode == 1 and message in proc.stderr and str(scene) in proc.stderr
    assert len(proc.stderr.strip().splitlines()[0]) > 0 and "Traceback" not in proc.stderr


def test_batch_goes_on_past_bad_scenes(tmp_path):
    good = write(tmp_path / "good.tif", speckle((32, 32)))
    text = tmp_path / "notes.tif"
    text.write_text("this is not a raster\n")
    truncated = tmp_path / "trunc.tif"
    truncated.write_bytes(write(tmp_path / "big.tif", speckle((256, 256))).read_bytes()[:3000])
    empty = tmp_path / "zero.tif"
    empty.write_bytes(b"")
    proc = sarkit("slice", text, truncated, empty, good, "-o", tmp_path / "t", "-g", "32")
    assert proc.returncode == 1
    assert {r["scene"] for r in records(proc)} == {str(good)}
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    for bad, line in zip((text, truncated, empty), errors, strict=True):
        assert str(bad) in line
    assert "Traceback" not in proc.stderr


def test_unknown_sensor_lists_known(tmp_path):
    scene = write(tmp_path / "s.tif", speckle((32, 32)))
    proc = sarkit("slice", scene, "-o", tmp_path / "t", "--sensor", "sputnik")
    assert proc.returncode == 2
    assert "unknown sensor 'sputnik'" in proc.stderr and "gaofen3" in proc.stderr


def test_plugin_sensor_is_used(tmp_path):
    scene = write(tmp_path / "ICEYE_X7_GRD_SLH_1_20210101T000000.tif", speckle((32, 32)))
    (rec,) = records(sarkit("slice", scene, "-o", tmp_path / "t", "-g", "64", check=0))
    assert rec["sensor"] == "iceye" and rec["band"] == "X"
    other = write(tmp_path / "x.tif", speckle((32, 32)))
    (rec,) = records(
        sarkit("slice", other, "-o", tmp_path / "t", "-g", "64", "--sensor", "iceye", check=0)
    )
    assert rec["sensor"] == "iceye"


def test_rerun_reuses_tiles_and_no_partial_files(tmp_path):
    scene = write(tmp_path / "s.tif", speckle((64, 64)))
    first = records(sarkit("slice", scene, "-o", tmp_path / "t", "-g", "64", check=0))
    stamp = {r["path"]: os.stat(r["path"]).st_mtime_ns for r in first}
    # a half-written temporary from a killed run never shadows a final name
    leftover = tmp_path / "t" / "s" / "L" / ".r000_c000.tif.abc.part"
    leftover.write_bytes(b"junk")
    second = sarkit("slice", scene, "-o", tmp_path / "t", "-g", "64", check=0)
    assert records(second) == first
    assert "reused (already written)" in second.stderr
    assert all(os.stat(p).st_mtime_ns == m for p, m in stamp.items())
    finals = sorted(p.name for p in (tmp_path / "t" / "s" / "L").glob("r*.tif"))
    assert finals == ["r000_c000.tif", "r000_c001.tif", "r001_c000.tif", "r001_c001.tif"]


def test_damaged_tile_from_a_crash_is_rewritten(tmp_path):
    scene = write(tmp_path / "s.tif", speckle((64, 64)))
    first = records(sarkit("slice", scene, "-o", tmp_path / "t", "-g", "64", check=0))
    damaged = first[0]["path"]
    with open(damaged, "r+b") as fh:
        fh.truncate(100)
    again = sarkit("slice", scene, "-o", tmp_path / "t", "-g", "64", check=0)
    assert records(again) == first
    with rasterio.open(damaged) as tile:
        assert tile.read(1).min() >= 1


def test_ctrl_c_stops_cleanly_and_a_rerun_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    scene = write(tmp_path / "big.tif", speckle((2048, 2048)))
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "sarkit", "slice", str(scene), "-o", str(out), "-g", "128",
           "--records", str(tmp_path / "tiles.jsonl")]  # fmt: skip
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.time() + 60
    while not list(out.rglob("r*.tif")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt landed")
    assert proc.returncode == 130
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert not (tmp_path / "tiles.jsonl").exists(), "no half-written record file"
    assert not list(out.rglob("*.part"))
    again = sarkit("slice", scene, "-o", out, "-g", "128", check=0)
    assert len(records(again)) == 32 * 32  # 2 m pixels: 64 px windows
    assert "reused (already written)" in again.stderr


def test_screened_tiles_agree_with_the_exact_mask(tmp_path):
    """Whole tiles skip the validity mask when the screening table finds no possible
    nodata; tiles with zeros or NaN take the exact path. Both must give the same bytes."""
    from sarkit.raster.quantise import NODATA_OUT, gather, lut_index
    from sarkit.raster.scene import valid_mask
    from sarkit.raster.slicer import SceneJob, SliceOptions
    from sarkit.report import Report

    data = speckle((64, 64), seed=5)
    data[3, 3] = 0.0  # an isolated zero: dark speckle, valid
    data[10, 50] = np.nan
    data[5, 40] = 0.0  # with the NaN: a zero does not let the NaN through
    data[40:, :24] = 0.0  # a zero-filled corner: nodata
    data[34:64:2, 40:64:2] = 0.0  # 180 isolated zeros: more than a square's worth, all valid
    path = write(tmp_path / "s.tif", data)
    options = SliceOptions(out_dir=tmp_path / "t", ground_sizes=[64.0], max_nodata=1.0)
    job = SceneJob(path, options, Report("slice"))
    seen = set()
    for r0 in (0, 32):
        for c0 in (0, 32):
            values = data[r0 : r0 + 32, c0 : c0 + 32].copy()
            pixels, frac = job.quantise(values, None)
            valid = valid_mask(values, 0.0, zero_runs=True)
            expected = np.take(job.lut, lut_index(values))
            expected[~valid] = NODATA_OUT
            assert np.array_equal(pixels, expected)
            assert frac == pytest.approx(1 - valid.mean())
            seen.add(round(frac, 4))
    assert seen == {0.0, round(1 / 1024, 4), round(24 * 24 / 1024, 4)}
    assert job.quantise(data[:32, :32].copy(), None)[0][3, 3] > 0
    # which path each tile took: the isolated zero needs the second (NaN-only) table; so
    # does the NaN's tile, which it then sends to the exact mask; the corner's and the 180
    # zeros' tiles go straight to the exact mask
    for r0, c0, tables, exact in ((0, 0, 2, False), (0, 32, 2, True), (32, 0, 1, True),
                                  (32, 32, 1, True)):  # fmt: skip
        values = data[r0 : r0 + 32, c0 : c0 + 32].copy()
        passes = []
        got = job.screened(lambda table, v=values, p=passes: p.append(table) or gather(v, table))
        assert (got is None, len(passes)) == (exact, tables), (r0, c0)
        assert passes[0] is job.screen and passes[-1] is not job.screen or tables == 1


def test_fit_sample_reads_whole_blocks(tmp_path):
    """The quantiser's sample windows sit on the block grid: each reads one block, not four."""
    from sarkit.raster.slicer import fit_windows

    data = speckle((2200, 2000), seed=3)
    path = tmp_path / "b.tif"
    profile = dict(driver="GTiff", width=2000, height=2200, count=1, dtype="float32")
    with rasterio.open(path, "w", tiled=True, blockxsize=128, blockysize=128, **profile) as ds:
        ds.write(data, 1)
    with rasterio.open(path) as ds:
        windows = fit_windows(ds, 1)
    assert len(windows) > 20
    for w in windows:
        assert w.col_off % 128 == 0 and w.row_off % 128 == 0 and (w.width, w.height) == (128, 128)
        assert w.col_off + w.width <= 2000 and w.row_off + w.height <= 2200


def _work_or_die(specs):
    """A worker that dies as a bus error in a shrunk map would kill it, on the 'bad' scene."""
    from sarkit.raster import slicer

    if slicer._WORKER["job"].path.stem == "bad":
        os.kill(os.getpid(), signal.SIGKILL)
    return _REAL_WORK(specs)


def test_a_dead_worker_fails_its_scene_not_the_batch(tmp_path, monkeypatch):
    """A worker killed mid-scene (out of memory; a bus error if the file shrinks while it
    is mapped) is that scene's one-line error; the batch goes on with the next scene."""
    from sarkit import plugins
    from sarkit.commands.slice import _slice_all
    from sarkit.raster import slicer
    from sarkit.report import Report

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("worker processes are forked only where fork exists")
    plugins.get_manager()
    scenes = [write(tmp_path / f"{name}.tif", speckle((256, 256), seed=i)) for i, name in
              enumerate(("bad", "good"))]  # fmt: skip
    monkeypatch.setattr(slicer, "_work", _work_or_die)
    options = slicer.SliceOptions(out_dir=tmp_path / "t", ground_sizes=[64.0], workers=2)
    report = Report("slice")
    _slice_all(scenes, options, report, str(tmp_path / "r.jsonl"))
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(lines) == 64 and all('"scene":"' + str(scenes[1]) in line for line in lines)
    assert len(report.errors) == 1 and str(scenes[0]) in report.errors[0]
    assert "worker process died" in report.errors[0] and "\n" not in report.errors[0]
    assert report.skipped["scene not sliced"] == 1
