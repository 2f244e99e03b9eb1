"""The plugin as a user installs it: discovered by sarkit, recognised by name, usable by slice."""

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from sarkit_iceye import ICEYE


def sarkit(*args):
    return subprocess.run(
        [sys.executable, "-m", "sarkit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_entry_point_is_installed():
    names = {ep.name: ep.value for ep in entry_points(group="sarkit")}
    assert names.get("iceye") == "sarkit_iceye"


def test_recognises_iceye_products():
    assert ICEYE.matches(Path("ICEYE_X7_GRD_SLH_52797_20210127T205305.tif"), {})
    assert ICEYE.matches(Path("scene.tif"), {"TIFFTAG_IMAGEDESCRIPTION": '{"producer": "ICEYE"}'})
    assert not ICEYE.matches(Path("S1A_IW_GRDH_1SDV.tif"), {})


def test_listed_and_used_by_slice(tmp_path):
    listed = [json.loads(line) for line in sarkit("plugins", "--json").stdout.splitlines()]
    assert any(p["name"] == "iceye" for p in listed)
    scene = tmp_path / "ICEYE_X9_SLC_SM_1_20240101T000000.tif"
    data = np.random.default_rng(0).random((40, 40)).astype(np.float32) + 0.1
    with rasterio.open(
        scene,
        "w",
        driver="GTiff",
        width=40,
        height=40,
        count=1,
        dtype="float32",
        crs="EPSG:32633",
        transform=Affine(0.5, 0, 400000, 0, -0.5, 5000000),
    ) as ds:
        ds.write(data, 1)
    proc = sarkit("slice", scene, "-o", tmp_path / "tiles", "--ground-size", "10")
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(recs) == 4 and {r["sensor"] for r in recs} == {"iceye"}
    assert {r["band"] for r in recs} == {"X"}
