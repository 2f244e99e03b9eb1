"""caption: prompts, parsing, the multi-scale chain and the offline backend on real SAR tiles."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import sarkit, shared

from sarkit.caption import CaptionOptions
from sarkit.caption.chain import caption_records
from sarkit.caption.parsing import extract, problem
from sarkit.caption.templates import Templates, find_prompts
from sarkit.report import Report

TERRAIN = (
    "Terrain",
    "Functionality",
    "Distribution",
    "Layout",
    "Boundary",
    "Buildings",
    "Roads",
    "Water",
)


def record(rid, path, **extra):
    base = {
        "id": rid,
        "path": str(path),
        "scene": "scene.tif",
        "scale": "L",
        "parent": None,
        "window": [0, 0, 800, 800],
        "pixel_m": 3.0,
        "ground_m": 2400,
        "crs": None,
        "transform": None,
        "sensor": "sentinel1",
        "band": "C",
        "polarization": "VV",
        "nodata_frac": 0.0,
        "geo": {
            "center": [121.4737, 31.2304],
            "footprint": [],
            "place": {
                "name": "Shanghai",
                "admin1": "Shanghai",
                "country": "CN",
                "distance_km": 7.5,
            },
        },
    }
    base.update(extra)
    return base


def mask_ships(image_path: str) -> int:
    """Ships in HRSID's own mask of the image (green blobs), by connected components."""
    from PIL import Image
    from scipy import ndimage as ndi

    path = Path(image_path)
    mask = np.asarray(Image.open(path.parents[1] / "masks" / (path.stem + ".png")).convert("L"))
    return ndi.label(mask > 40)[1]


def run(records, **opts) -> tuple[list[dict], Report]:
    report = Report("caption")
    out = list(caption_records(iter(records), CaptionOptions(**opts), report))
    return out, report


def umbra_tiles(tmp: Path) -> list[dict]:
    """L = the whole Umbra scene, M = its four quarters, S = one quarter of one M (real pixels)."""
    import rasterio
    from rasterio.windows import Window

    scene = shared("scenes", "umbra_yasur", "umbra_mount_yasur.tiff")
    specs = [("L", None, (0, 0, 2000, 2000))]
    specs += [(f"M{r}{c}", "L", (c * 1000, r * 1000, 1000, 1000)) for r in (0, 1) for c in (0, 1)]
    specs += [("S00", "M01", (1000, 0, 500, 500))]
    recs = []
    with rasterio.open(scene) as src:
        for name, parent, (x, y, w, h) in specs:
            data = src.read(1, window=Window(x, y, w, h))
            path = tmp / f"{name}.tif"
            with rasterio.open(
                path, "w", driver="GTiff", width=w, height=h, count=1, dtype="uint8", nodata=0
            ) as dst:
                dst.write(data, 1)
            recs.append(
                record(
                    f"yasur/{name}",
                    path,
                    scale=name[0],
                    parent=f"yasur/{parent}" if parent else None,
                    window=[x, y, w, h],
                    pixel_m=0.59,
                    ground_m=w * 0.59,
                    sensor="umbra",
                    band="X",
                    geo={
                        "center": [169.449, -19.527],
                        "footprint": [],
                        "place": {
                            "name": "Isangel",
                            "admin1": "Tafea",
                            "country": "VU",
                            "distance_km": 19.3,
                        },
                    },
                )
            )
    return recs


# -- prompts ---------------------------------------------------------------------------------


def test_task_fields_match_the_published_sample_and_prompts_carry_the_record():
    templates = Templates(find_prompts())
    sample = json.loads(shared("reference", "fusar_klip_caption_part1.json").read_text())[0]
    assert templates.task("terrain").field_names == tuple(k for k in sample if k != "image_id")
    for name in ("ground", "marine"):
        assert len(set(templates.task(name).field_names)) == 8
    rec = record("t/L", "x.tif", pixel_m=0.59, ground_m=1000, band="X", polarization="HH")
    prompt = templates.build(rec, templates.task("terrain"), "L", None)
    for needle in (
        "Shanghai",
        "CN",
        "31.2304",
        "121.4737",
        "sentinel1",
        "X band",
        "3 cm",
        "HH",
        "0.59 m",
        "1000 m",
        "Step 5",
        "large scale",
        *TERRAIN,
    ):
        assert needle in prompt.user or needle in prompt.system, needle
    child = record("t/M", "x.tif", scale="M", parent="t/L")
    parent = {"scale": "L", "texts": {"Terrain": "The terrain is classified as a delta plain"}}
    a = templates.build(child, templates.task("terrain"), "M", parent)
    b = templates.build(child, templates.task("terrain"), "M", None, "parent t/L failed")
    assert "delta plain" in a.user and "t/L" in a.user
    assert "parent t/L failed" in b.user and a.sha256 != b.sha256


def test_prompts_folder_from_option_or_env(tmp_path, monkeypatch):
    import shutil

    mine = tmp_path / "mine"
    shutil.copytree(find_prompts(), mine)
    (mine / "system.txt").write_text("You read radar images for $country.")
    monkeypatch.setenv("SARKIT_PROMPTS", str(mine))
    templates = Templates(find_prompts())
    prompt = templates.build(record("a", "x"), templates.task("marine"), "L", None)
    assert prompt.system == "You read radar images for CN."
    (mine / "tile.txt").write_text("Tile $tile_id at $nowhere")
    with pytest.raises(Exception, match=r"tile\.txt: unknown placeholder \$nowhere"):
        Templates(find_prompts()).build(record("a", "x"), templates.task("marine"), "L", None)
    with pytest.raises(Exception, match="no HCoT prompts folder"):
        find_prompts(tmp_path / "empty")


def test_parsing_json_labelled_lines_and_what_is_missing():
    task = Templates(find_prompts()).task("terrain")
    lines = "Sure.\n**Terrain**: plain\n- Functionality: port\n  continued here\n" + "\n".join(
        f"{n}: text {n}" for n in TERRAIN[2:]
    )
    got = extract(lines, task)
    assert got["Functionality"] == "port continued here" and len(got) == 8
    fenced = "```json\n" + json.dumps({n.lower(): f"v {n}" for n in TERRAIN}) + "\n```"
    assert extract(fenced, task)["Water"] == "v Water"
    partial = extract("Terrain: hills\nWater:\nRoads: none", task)
    assert set(partial) == {"Terrain", "Roads"}
    assert problem(partial, task).startswith("missing or empty fields Functionality")


# -- the offline backend on real tiles --------------------------------------------------------


def test_offline_sea_and_harbour_tiles_get_different_fitting_texts():
    images = shared("hrsid_mini", "images")
    sea = record("hrsid/sea", images / "P0004_4200_5000_6000_6800.jpg")
    harbour = record("hrsid/harbour", images / "P0001_600_1400_9600_10400.jpg")
    out, report = run([sea, harbour], task="terrain")
    assert report.done == 2 and not report.errors
    s, h = (r["texts"] for r in out)
    assert all(s.values()) and all(h.values()) and set(s) == set(TERRAIN)
    assert "open water" in s["Terrain"] and "open water" not in h["Terrain"]
    assert "built-up" in h["Terrain"] and "moderate" in h["Buildings"]
    assert s["Buildings"].startswith("Building presence: none")
    assert "confidence" in s["Water"] and "confidence" in h["Water"]
    assert sum(s[k] != h[k] for k in TERRAIN) >= 7
    caption = out[0]["caption"]
    assert caption["backend"] == "offline" and caption["cost"] == 0
    assert len(caption["prompt_sha256"]) == 64 and len(caption["layers"]) == 5
    assert "Shanghai" in caption["layers"][0]

    # auto: the sea tile is a marine task, with the three ships counted and measured in metres
    auto, _ = run([sea], task="auto")
    texts = auto[0]["texts"]
    assert auto[0]["caption"]["task"] == "marine"
    assert texts["Quantity"].startswith(f"Ship count: {mask_ships(sea['path'])} ")
    low, high = map(float, re.search(r"(\d+) m to (\d+) m long", texts["Size"]).groups())
    assert 60 <= low <= high <= 250  # ~20-80 pixels at 3 m
    # deterministic
    again, _ = run([sea], task="auto")
    assert again[0]["texts"] == texts


def test_offline_multiscale_chain_on_umbra_parents_first_and_failed_parent(tmp_path):
    recs = umbra_tiles(tmp_path)
    shuffled = recs[::-1]  # children before parents in the input
    out, report = run(shuffled, concurrency=3, task="terrain")
    assert report.done == len(recs) and [r["id"] for r in out] == [r["id"] for r in shuffled]
    by_id = {r["id"]: r for r in out}
    for r in out:
        assert len(r["texts"]) == 8 and all(r["texts"].values())
        assert r["caption"]["context"] == r["parent"]
    assert "hilly or mountainous" in by_id["yasur/L"]["texts"]["Terrain"]
    assert by_id["yasur/M01"]["caption"]["scale_stage"] == "M"
    assert by_id["yasur/S00"]["caption"]["scale_stage"] == "S"
    # the child's prompt (hash) depends on the parent's text, and its text cites the parent
    assert "enclosing M tile" in json.dumps(by_id["yasur/S00"]["texts"])

    # a parent that fails: its children are captioned without context and say so
    broken = [dict(r) for r in recs]
    broken[0]["path"] = str(tmp_path / "missing.tif")
    out, report = run(broken)
    by_id = {r["id"]: r for r in out}
    assert "cannot read tile" in by_id["yasur/L"]["caption"]["failed"]
    assert "texts" not in by_id["yasur/L"]
    assert len(report.errors) == 1 and "yasur/L" in report.errors[0]
    m = by_id["yasur/M00"]["caption"]
    assert m["context"] is None and "parent yasur/L failed" in m["context_note"]
    assert by_id["yasur/S00"]["caption"]["context"] == "yasur/M01"


def test_cli_offline_unknown_llm_dry_run_and_journal(tmp_path):
    images = shared("hrsid_mini", "images")
    recs = [record(f"t{i}", p) for i, p in enumerate(sorted(images.glob("*.jpg"))[:3])]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))

    bad = sarkit("caption", src, "--llm", "no-such-model")
    assert bad.returncode == 2 and "gpt-4.1" in bad.stderr and "offline" in bad.stderr

    dry = sarkit(
        "caption",
        src,
        "--llm",
        "gpt-4.1",
        "--dry-run",
        "--limit",
        "1",
        check=0,
        env={"OPENAI_API_KEY": "", "SARKIT_API_KEY": ""},
    )
    assert dry.stdout == "" and "Step 1 - Earth cognition" in dry.stderr
    assert "Shanghai" in dry.stderr and "would cost at most $" in dry.stderr

    journal = tmp_path / "run.journal"
    first = sarkit(
        "caption",
        src,
        "--llm",
        "offline",
        "--journal",
        journal,
        "-o",
        tmp_path / "a.jsonl",
        check=0,
    )
    assert "done" in first.stderr
    second = sarkit("caption", src, "--llm", "offline", "--journal", journal, check=0)
    assert "from journal" in second.stderr
    a = (tmp_path / "a.jsonl").read_text().splitlines()
    assert a == second.stdout.splitlines() and len(a) == 3
    entries = [json.loads(x) for x in journal.read_text().splitlines()]
    assert len(entries) == 3 and {e["id"] for e in entries} == {"t0", "t1", "t2"}


def test_offline_texts_follow_the_pixels_on_a_made_tile(tmp_path):
    """A tile with a dark sea half and a bright built-up half: water side and blocks located."""
    import rasterio

    rng = np.random.default_rng(0)
    img = rng.gamma(4.0, 4.0, (512, 512))  # dark sea speckle, grey ~16
    img[:, 256:] = rng.gamma(2.0, 40.0, (512, 256))  # land, grey ~80
    for r in range(40, 480, 110):  # bright textured blocks (buildings), grey ~200
        for c in (300, 400):
            img[r : r + 60, c : c + 45] = rng.gamma(2.0, 100.0, (60, 45))
    img = np.clip(img, 1, 255).astype(np.uint8)
    path = tmp_path / "half.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=512, height=512, count=1, dtype="uint8"
    ) as dst:
        dst.write(img, 1)
    out, _ = run([record("half", path, pixel_m=2.0)], task="terrain")
    texts = out[0]["texts"]
    assert "left part" in texts["Water"] and "50%" in texts["Water"]
    assert "right part" in texts["Buildings"] and "blocks" in texts["Buildings"]
    assert "open water" not in texts["Terrain"]


def test_journal_ignores_a_torn_last_line_and_is_held_by_one_run(tmp_path):
    from sarkit.caption.journal import Journal, entry_key
    from sarkit.errors import SarkitError

    path = tmp_path / "j"
    key = entry_key("a", "openai", "m", "0" * 64)
    done = {"key": key, "id": "a", "status": "done", "texts": {}, "caption": {}}
    path.write_bytes((json.dumps(done) + "\n" + '{"key": "b\tx", "id": "b", "sta').encode())
    journal = Journal(path)
    assert journal.get(key) and journal.torn == 1 and len(journal.done) == 1
    with pytest.raises(SarkitError, match="in use by another"):
        Journal(path)
    journal.append({"key": "k2", "id": "b", "status": "done"})
    journal.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["id"] == "b"  # the new entry starts on its own line
    assert len(Journal(path).done) == 2


def test_parent_cycles_are_reported_not_hung(tmp_path):
    images = shared("hrsid_mini", "images")
    jpg = images / "P0004_4200_5000_6000_6800.jpg"
    recs = [record("a", jpg, parent="b"), record("b", jpg, parent="a"), record("c", jpg)]
    out, report = run(recs, task="terrain")
    assert [r["id"] for r in out] == ["c"]
    assert len(report.errors) == 2 and all("cycle" in e for e in report.errors)


def test_offline_ground_task_measures_mstar_vehicles_in_metres():
    """MSTAR chips (0.2 m pixels): one vehicle each, 2S1/T72/ZIL131 are 6.9-9.5 m long."""
    recs = []
    for k in (0, 7, 8):  # 2S1, T72, ZIL131
        chip = sorted(shared("mstar", "train", str(k)).glob("*.jpeg"))[0]
        recs.append(
            record(
                f"mstar/{k}",
                chip,
                scale="S",
                pixel_m=0.2,
                ground_m=25.6,
                band="X",
                polarization="HH",
                geo=None,
            )
        )
    out, report = run(recs, task="auto")
    assert report.done == 3
    for r in out:
        texts = r["texts"]
        assert r["caption"]["task"] == "ground"
        assert texts["Quantity"].startswith("Target count: 1 ")
        length = float(re.search(r"about ([\d.]+) m long", texts["Size"]).group(1))
        assert 3.5 <= length <= 10, texts["Size"]
        assert "vehicle" in texts["Category"]
        assert "unknown location" in texts["Scene"]


def test_offline_ship_counts_agree_with_hrsid_masks():
    """Across all HRSID chips: the marine Ship count field against the published ship masks."""
    images = sorted(shared("hrsid_mini", "images").glob("*.jpg"))
    recs = [record(f"h/{p.stem}", p) for p in images]
    out, report = run(recs, task="marine", concurrency=2)
    assert report.done == len(images)
    errors = []
    for r, path in zip(out, images, strict=True):
        said = int(re.match(r"Ship count: (\d+) ", r["texts"]["Quantity"]).group(1))
        errors.append(abs(said - mask_ships(str(path))))
    exact = sum(e == 0 for e in errors) / len(errors)
    assert exact >= 0.6 and sum(errors) / len(errors) <= 1.5, (exact, errors)


def test_offline_reads_a_long_straight_dark_strip_as_runway_not_water(tmp_path):
    import rasterio

    rng = np.random.default_rng(1)
    img = rng.gamma(2.0, 40.0, (512, 512))  # open land, grey ~80
    img[30:480, 240:260] = rng.gamma(4.0, 4.0, (450, 20))  # 900 m x 40 m smooth dark strip
    path = tmp_path / "strip.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=512, height=512, count=1, dtype="uint8"
    ) as dst:
        dst.write(np.clip(img, 1, 255).astype(np.uint8), 1)
    out, _ = run([record("strip", path, pixel_m=2.0)], task="terrain")
    texts = out[0]["texts"]
    assert "dark strip" in texts["Roads"] and "runways" in texts["Roads"]
    assert texts["Water"].startswith("Water presence: no water body detected")
    assert "airfield" in texts["Functionality"]


def test_pipeline_slice_georef_caption_on_umbra(tmp_path):
    """The real upstream records: nested L/M tiles with relative paths and geo.place."""
    scene = shared("scenes", "umbra_yasur", "umbra_mount_yasur.tiff")
    tiles = sarkit("-q", "slice", scene, "-o", "tiles", "-g", "1000,500", cwd=tmp_path, check=0)
    geo = sarkit("-q", "georef", input=tiles.stdout, cwd=tmp_path, check=0)
    (tmp_path / "geo.jsonl").write_text(geo.stdout)
    out = sarkit("-q", "caption", tmp_path / "geo.jsonl", "-j", "2", check=0)  # other cwd
    records = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(records) == len(geo.stdout.splitlines()) >= 3
    by_id = {r["id"]: r for r in records}
    for r in records:
        assert len(r["texts"]) == 8 and all(r["texts"].values())
        stage = r["caption"]["scale_stage"]
        assert stage == r["scale"] and r["caption"]["context"] == r["parent"]
        if r["parent"]:
            assert by_id[r["parent"]]["scale"] == "L"
    assert "Tafea, VU" in json.dumps(records[0]["caption"]["layers"])
