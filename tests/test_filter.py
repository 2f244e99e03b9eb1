"""`sarkit filter` on real SAR tiles (Umbra, HRSID) and on tiles the tests make themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import sarkit, shared
from PIL import Image

from sarkit import plugins
from sarkit.quality import FilterOptions
from sarkit.quality.features import load_tile, read_pixels, tile_features
from sarkit.quality.report import ContactSheet
from sarkit.quality.rules import BUILTIN_FILTERS, FAIL, PASS, QualityFilter
from sarkit.quality.screen import screen
from sarkit.report import Report

UMBRA = ("scenes", "umbra_yasur", "umbra_mount_yasur.tiff")


def _write(path: Path, data: np.ndarray) -> str:
    profile = dict(driver="GTiff", width=data.shape[1], height=data.shape[0], count=1)
    with rasterio.open(path, "w", dtype="uint8", **profile) as ds:
        ds.write(data.astype(np.uint8), 1)
    return str(path)


def _records(path: Path, items: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "path": p}) + "\n" for i, p in items))
    return path


def _log_quantised_speckle(rng, n: int, looks: int) -> np.ndarray:
    """Pure speckle as a SAR tiler would store it: log amplitude, 1..255."""
    amplitude = np.sqrt(rng.gamma(looks, 1.0 / looks, (n, n)))
    logs = np.log(amplitude)
    lo, hi = np.percentile(logs, [1, 99.5])
    return 1 + 254 * np.clip((logs - lo) / (hi - lo), 0, 1)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, dict[str, bool], dict[str, str]]:
    """Structured real tiles (keep) vs. low-information tiles (drop), with their kind."""
    hrsid = sorted(shared("hrsid_mini", "images").glob("*.jpg"))
    scene = shared(*UMBRA)
    tmp = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(7)
    truth: dict[str, bool] = {}
    kind: dict[str, str] = {}
    items: list[tuple[str, str]] = []

    def add(rid: str, path: str, keep: bool, what: str) -> None:
        items.append((rid, path))
        truth[rid] = keep
        kind[rid] = what

    for p in hrsid:  # harbour and ship scenes, 800 px JPEGs read as grey
        add(f"hrsid/{p.stem}", str(p), True, "hrsid")
    with rasterio.open(scene) as src:
        umbra = src.read(1)
    size = 421
    for r in range(0, 2000 - size + 1, size):
        for c in range(0, 2000 - size + 1, size):
            win = umbra[r : r + size, c : c + size]
            add(f"umbra/{r}_{c}", _write(tmp / f"umbra_{r}_{c}.tif", win), True, "umbra")
    for i, value in enumerate((1, 40, 128, 250)):
        flat = np.full((421, 421), value)
        add(f"low/constant{i}", _write(tmp / f"c{i}.tif", flat), False, "constant")
        noisy = np.clip(value + rng.integers(-1, 2, (421, 421)), 1, 255)
        add(f"low/near-constant{i}", _write(tmp / f"nc{i}.tif", noisy), False, "constant")
    for i, (n, looks) in enumerate([(256, 1), (421, 1), (421, 4), (800, 1), (800, 3), (600, 2)]):
        logq = _log_quantised_speckle(rng, n, looks)
        add(f"low/speckle{i}", _write(tmp / f"s{i}.tif", logq), False, "speckle")
        linear = np.clip(np.sqrt(rng.gamma(looks, 1.0 / looks, (n, n))) * 40, 1, 255)
        add(f"low/speckle-linear{i}", _write(tmp / f"sl{i}.tif", linear), False, "speckle")
    for i, frac in enumerate((0.7, 0.85, 0.95)):
        band = umbra[800:1221, 400:821].copy()
        band[:, : int(421 * frac)] = 0
        add(f"low/nodata-band{i}", _write(tmp / f"nb{i}.tif", band), False, "nodata")
        corner = umbra[:800, :800].copy()
        yy, xx = np.mgrid[:800, :800]
        corner[(xx + yy) < frac * 1584] = 0
        add(f"low/nodata-corner{i}", _write(tmp / f"nd{i}.tif", corner), False, "nodata")
    return _records(tmp / "tiles.jsonl", items), truth, kind


def _run(records: Path, *args: str, check: int = 0):
    proc = sarkit("filter", str(records), "--mark", *args, check=check)
    return proc, [json.loads(line) for line in proc.stdout.splitlines()]


def test_labelled_check_precision_recall_of_drop(labelled, tmp_path):
    records, truth, kind = labelled
    proc, out = _run(records, "-j", "2", "--report", str(tmp_path / "sheet.png"))
    assert [r["id"] for r in out] == list(truth)  # all marked, input order kept
    dropped = {r["id"] for r in out if not r["quality"]["keep"]}
    bad = {rid for rid, keep in truth.items() if not keep}
    precision = len(dropped & bad) / max(len(dropped), 1)
    recall = len(dropped & bad) / len(bad)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall, dropped ^ bad)
    reasons = {r["id"]: r["quality"]["reason"] for r in out}
    expected = {"constant": "constant", "nodata": "nodata", "speckle": "structure-poor"}
    right = [reasons[rid] == expected[kind[rid]] for rid in bad]
    assert sum(right) / len(right) >= 0.9, {rid: reasons[rid] for rid in bad}
    q = out[0]["quality"]
    for key in ("entropy", "enl", "cv", "glcm_contrast_d1", "glcm_asm_d4", "score", "keep"):
        assert key in q
    assert "structure-poor" in proc.stderr and "constant" in proc.stderr  # summary table
    with Image.open(tmp_path / "sheet.png") as im:
        assert im.format == "PNG" and im.width > 500 and im.height > 300


def test_region_screening_switched_off_keeps_open_speckle(labelled):
    records, truth, kind = labelled
    _, out = _run(records, "--disable", "structure-poor")
    by_id = {r["id"]: r["quality"] for r in out}
    assert all(by_id[rid]["reason"] != "structure-poor" for rid in by_id)
    assert all(by_id[rid]["reason"] == "constant" for rid in by_id if kind[rid] == "constant")
    assert all(by_id[rid]["keep"] for rid in by_id if kind[rid] in ("hrsid", "umbra"))


def test_seed_labels_steer_the_knn(labelled, tmp_path):
    """Region screening off, a few hand labels per kind: the kNN sorts out the rest."""
    records, truth, kind = labelled
    speckle = [rid for rid in truth if kind[rid] == "speckle"]  # log / linear alternate
    structured = [rid for rid in truth if kind[rid] in ("hrsid", "umbra")]
    keep_labels = [rid for rid in truth if kind[rid] == "hrsid"][:2]
    keep_labels += [rid for rid in truth if kind[rid] == "umbra"][:2]
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "id,label\n"
        + "".join(f"{rid},drop\n" for rid in speckle[:4])
        + "".join(f"{rid},keep\n" for rid in keep_labels)
    )
    _, out = _run(records, "--disable", "structure-poor", "--seed-labels", str(labels))
    by_id = {r["id"]: r["quality"] for r in out}
    assert by_id[speckle[0]]["reason"] == "seed-label"
    others = speckle[4:]
    assert sum(by_id[rid]["reason"] == "knn" for rid in others) >= 0.75 * len(others)
    assert sum(by_id[rid]["keep"] for rid in structured) >= 0.9 * len(structured)
    assert all(by_id[rid]["reason"] == "constant" for rid in truth if kind[rid] == "constant")


def test_seed_labels_naming_unknown_ids_is_an_error(labelled, tmp_path):
    records, truth, _ = labelled
    labels = tmp_path / "labels.csv"
    labels.write_text(f"{next(iter(truth))},keep\nno/such/tile,drop\nanother-ghost,keep\n")
    proc = sarkit("filter", str(records), "--seed-labels", str(labels), check=1)
    assert "no/such/tile" in proc.stderr and "another-ghost" in proc.stderr
    assert proc.stdout == ""
    labels.write_text("umbra/0_0,maybe\n")
    proc = sarkit("filter", str(records), "--seed-labels", str(labels), check=1)
    assert "maybe" in proc.stderr and "labels.csv:1" in proc.stderr


def test_umbra_slice_border_tiles_dropped_for_nodata(tmp_path):
    """Real `sarkit slice` tiles at two ground sizes; partial edge tiles kept by slice."""
    scene = shared(*UMBRA)
    tiles = tmp_path / "tiles.jsonl"
    sarkit(
        *("slice", scene, "-o", tmp_path / "tiles", "--ground-size", "500,250"),
        *("--edge", "keep", "--min-coverage", "0.05", "--max-nodata", "1.0"),
        *("--records", tiles),
        check=0,
    )
    proc = sarkit("filter", tiles, "--mark", check=0)
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == len(tiles.read_text().splitlines()) > 20
    mostly_border = [r for r in out if r["coverage"] < 0.45]
    inside = [r for r in out if r["coverage"] == 1.0]
    assert mostly_border and inside
    assert all(r["quality"]["reason"] == "nodata" for r in mostly_border)
    assert all(r["quality"]["keep"] for r in inside)  # the volcano and its slopes
    assert all(r["quality"]["keep"] for r in out if r["coverage"] > 0.7)
    # without --mark the border tiles are gone and the summary says why
    kept = sarkit("filter", tiles, check=0)
    kept_ids = {json.loads(line)["id"] for line in kept.stdout.splitlines()}
    assert kept_ids == {r["id"] for r in out if r["quality"]["keep"]}
    assert "nodata" in kept.stderr


def test_scattered_zero_pixels_are_not_a_nodata_region():
    """The raw Umbra clip has ~24% zeros spread through dark speckle: none is a region."""
    with rasterio.open(shared(*UMBRA)) as src:
        raw = src.read(1)
    assert (raw == 0).mean() > 0.2
    tile = load_tile(shared(*UMBRA))
    assert tile.nodata.mean() < 0.02
    assert tile_features(tile)["structure"] > 2


def test_nodata_region_fraction_and_glcm_ignore_nodata(tmp_path):
    with rasterio.open(shared(*UMBRA)) as src:
        crop = src.read(1, window=((0, 256), (0, 256)))
    crop = np.maximum(crop, 1)
    half = crop.copy()
    half[:, 128:] = 0
    f_half = tile_features(load_tile(_write(tmp_path / "half.tif", half)))
    f_left = tile_features(load_tile(_write(tmp_path / "left.tif", crop[:, :128])))
    assert f_half["nodata_frac"] == pytest.approx(0.5, abs=0.02)
    # the nodata half adds no GLCM pairs: texture equals the valid half's alone
    for key in ("glcm_correlation_d1", "glcm_contrast_d2", "glcm_homogeneity_d4"):
        assert f_half[key] == pytest.approx(f_left[key], rel=0.05), key


def test_rgb_jpeg_read_as_grey_and_tile_sizes_compare(tmp_path):
    jpg = sorted(shared("hrsid_mini", "images").glob("*.jpg"))[0]
    grey = read_pixels(jpg)
    assert grey.ndim == 2 and grey.dtype == np.uint8
    assert np.array_equal(grey, np.asarray(Image.open(jpg).convert("L")))
    # the same ground at twice the pixels measures the same on the working grid
    with rasterio.open(shared(*UMBRA)) as src:
        big = src.read(1, window=((700, 1724), (700, 1724)))
    big = np.maximum(big, 1)
    small = big.reshape(512, 2, 512, 2).mean(axis=(1, 3))
    fb = tile_features(load_tile(_write(tmp_path / "b.tif", big)))
    fs = tile_features(load_tile(_write(tmp_path / "s.tif", small)))
    assert load_tile(tmp_path / "b.tif").grid.shape == load_tile(tmp_path / "s.tif").grid.shape
    for key in ("glcm_correlation_d1", "glcm_homogeneity_d1", "glcm_energy_d2"):
        assert fb[key] == pytest.approx(fs[key], rel=0.1, abs=0.02), key


def test_bad_records_reported_by_id_and_skipped_or_marked(tmp_path):
    good = _write(
        tmp_path / "good.tif", np.maximum(np.random.default_rng(1).integers(0, 255, (64, 64)), 1)
    )
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"not a raster at all")
    records = _records(
        tmp_path / "r.jsonl",
        [("ok", good), ("gone", str(tmp_path / "missing.tif")), ("junk", str(garbage))],
    )
    with open(records, "a") as fh:
        fh.write('{"id": "nopath"}\n')
    proc = sarkit("filter", records, "--mark", "--disable", "structure-poor", check=1)
    out = {json.loads(line)["id"]: json.loads(line)["quality"] for line in proc.stdout.splitlines()}
    assert out["ok"]["keep"] is True
    assert out["gone"]["reason"] == "missing" and out["junk"]["reason"] == "unreadable"
    assert "nopath" not in out  # a record without 'path' is bad input, named by line
    for name in ("gone", "junk", "'path'"):
        assert name in proc.stderr
    plain = sarkit("filter", records, "--disable", "structure-poor", check=1)
    assert [json.loads(line)["id"] for line in plain.stdout.splitlines()] == ["ok"]


def test_empty_input_gives_empty_output_and_a_summary(tmp_path):
    proc = sarkit("filter", "--report", tmp_path / "empty.png", input="", check=0)
    assert proc.stdout == ""
    assert "sarkit filter" in proc.stderr and "done" in proc.stderr
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_unknown_disabled_filter_is_a_usage_error():
    proc = sarkit("filter", "--disable", "clouds", input="", check=2)
    assert "clouds" in proc.stderr and "structure-poor" in proc.stderr


class _TooDark(QualityFilter):
    """A third-party filter: drops tiles darker than a mean of 20 DN."""

    name = "too-dark"
    description = "mean below 20 DN"
    knn_features = ("dark_score",)

    def measure(self, tile):
        return {"dark_score": float(20.0 - tile.pixels[tile.pixels > 0].mean())}

    def verdict(self, quality, options):
        return FAIL if quality["dark_score"] > 0 else PASS


class _Plugin:
    @plugins.hookimpl
    def sarkit_quality_filters(self):
        return [_TooDark()]


def test_plugin_filter_adds_features_and_a_reason(labelled):
    records, truth, kind = labelled
    pm = plugins.get_manager()
    plugin = _Plugin()
    pm.register(plugin, name="test-too-dark")
    try:
        from sarkit.quality.screen import available_filters

        filters = available_filters()
        assert [f.name for f in filters][: len(BUILTIN_FILTERS)] == [
            f.name for f in BUILTIN_FILTERS
        ]
        assert filters[-1].name == "too-dark"
        rows = [json.loads(line) for line in records.read_text().splitlines()]
        wanted = {rid for rid in truth if kind[rid] in ("hrsid", "umbra")}
        report = Report("filter")
        out = list(screen([r for r in rows if r["id"] in wanted], FilterOptions(), report, filters))
    finally:
        pm.unregister(plugin)
    dark = [r for r in out if r["quality"]["dark_score"] > 0]
    assert dark and all(r["quality"]["reason"] == "too-dark" for r in dark)
    assert all(r["quality"]["keep"] for r in out if r["quality"]["dark_score"] <= 0)


def test_parallel_equals_serial_and_contact_sheet_groups(labelled):
    records, truth, _ = labelled
    rows = [json.loads(line) for line in records.read_text().splitlines()][::3]
    filters = list(BUILTIN_FILTERS)
    one = list(screen([dict(r) for r in rows], FilterOptions(jobs=1), Report("f"), filters))
    two = list(screen([dict(r) for r in rows], FilterOptions(jobs=2), Report("f"), filters))
    assert one == two
    sheet = ContactSheet(per_group=2)
    for r in one:
        sheet.add(r)
    groups = {"kept" if r["quality"]["keep"] else f"dropped: {r['quality']['reason']}" for r in one}
    assert set(sheet.samples) == groups
    assert all(len(v) <= 2 for v in sheet.samples.values())
    assert sum(sheet.counts.values()) == len(one)


def test_one_ship_on_open_sea_is_content_the_empty_sea_is_not(tmp_path):
    """Bright scatterers count in cells, not as a tile fraction: one ship keeps a tile."""
    rng = np.random.default_rng(3)
    sea = _log_quantised_speckle(rng, 512, 3) * 0.4 + 10  # dark, pure speckle
    ship = sea.copy()
    ship[200:206, 300:330] = 250  # a 30 x 6 px ship (0.07% of the tile)
    f_sea = tile_features(load_tile(_write(tmp_path / "sea.tif", sea)))
    f_ship = tile_features(load_tile(_write(tmp_path / "ship.tif", ship)))
    assert f_sea["structure"] < 1.0 <= f_ship["structure"]
    assert f_ship["bright_cells"] >= 12 and f_sea["bright_cells"] == 0


def test_rerun_on_marked_output_reuses_features(tmp_path):
    """Tune thresholds on a --mark output without measuring again (tiles may be gone)."""
    rng = np.random.default_rng(5)
    with rasterio.open(shared(*UMBRA)) as src:
        umbra = src.read(1, window=((400, 800), (400, 800)))
    saturated = np.maximum(umbra, 1)
    saturated[:, :150] = 255  # 37% of the tile clipped white
    tiles = {
        "umbra": _write(tmp_path / "u.tif", np.maximum(umbra, 1)),
        "white": _write(tmp_path / "w.tif", saturated),
        "speckle": _write(tmp_path / "s.tif", _log_quantised_speckle(rng, 400, 1)),
    }
    records = _records(tmp_path / "r.jsonl", list(tiles.items()))
    marked = tmp_path / "marked.jsonl"
    sarkit("filter", records, "--mark", "-o", marked, "-j", "1", check=0)
    first = {json.loads(line)["id"]: json.loads(line)["quality"] for line in marked.open()}
    assert first["white"]["reason"] == "saturated"
    assert first["speckle"]["reason"] == "structure-poor"
    assert first["umbra"]["keep"]
    for path in tiles.values():
        Path(path).unlink()
    again = sarkit(
        "filter", marked, "--mark", "--max-saturated", "0.5", "--disable", "knn", check=0
    )
    second = {
        json.loads(line)["id"]: json.loads(line)["quality"] for line in again.stdout.splitlines()
    }
    assert second["white"]["keep"] and second["white"]["reason"] is None
    assert second["speckle"]["reason"] == "structure-poor"
    assert second["umbra"]["entropy"] == first["umbra"]["entropy"]
    assert all(q["reason"] != "knn" for q in second.values())
    fresh = sarkit("filter", marked, "--mark", "--remeasure", check=1)
    assert "tile not found" in fresh.stderr
