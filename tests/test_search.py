"""`sarkit embed` and `sarkit search`: real MSTAR chips and tiny GeoTIFFs the tests make.

The model is a random-init KnowLIP run folder written directly (a 2-block 32-px ViT and
conftest's tiny BERT), so the tests check the plumbing and the arithmetic, not what a model
learned (docs/results.md has precision@10 of trained runs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from affine import Affine
from conftest import REPO, shared, tiny_bert
from rasters import write
from test_pretrain_data import mstar_records, write_jsonl


def make_run(folder: Path, seed: int = 0) -> Path:
    """A run folder as pretraining leaves it (model.json + model.safetensors), random init."""
    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig
    from sarkit.model.weights import save_weights

    config = KnowLIPConfig(
        vision="vit_tiny_patch16_224",
        image_size=32,
        vision_args={"depth": 2},
        text=str(tiny_bert()),
        text_layers=1,
        embed_dim=16,
        max_tokens=40,
        queue_size=0,
        image_mean=0.2,
        image_std=0.15,
    )
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(config.to_json())
    save_weights(KnowLIP(config), folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def recs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recs") / "mstar.jsonl"
    return write_jsonl(path, mstar_records(shared("mstar"), "val", 1)[:10])


@pytest.fixture(scope="module")
def index(run, recs, tmp_path_factory) -> Path:
    """The MSTAR index, embedded once through the CLI (batches of 4, 2 reader threads)."""
    from sarkit import cli

    out = tmp_path_factory.mktemp("idx") / "mstar.index"
    code = cli.run(["-q", "embed", str(recs), "--run", str(run), "-o", str(out), "-b", "4",
                    "-j", "2"])  # fmt: skip
    assert code == 0
    return out


def hits_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def model_of(run: Path):
    from sarkit.search.model import SearchModel

    return SearchModel(run)


def test_embed_stores_the_runs_unit_vectors_and_the_records(index, recs, run):
    from sarkit.search.archive import Archive

    archive = Archive.open(index)
    vectors, columns = archive.vectors(), archive.columns()
    rows = [json.loads(line) for line in recs.read_text().splitlines()]
    assert archive.count == len(rows) == len(vectors)
    assert sorted(columns["ids"].tolist()) == sorted(r["id"] for r in rows)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    model = model_of(run)
    ident = archive.manifest["model"]
    assert ident["sha256"] == model.sha256 and ident["dim"] == 16
    assert ident["normalisation"].startswith("l2")
    # the stored vector is the run's image feature of the tile, whatever the batching
    i = 3
    tile = model.tiles([{"id": "x", "path": str(columns["paths"][i])}], None)[0][0]
    with torch.no_grad():
        expected = model.lip.encode_images(tile[None])[1][0].numpy()
    np.testing.assert_allclose(vectors[i], expected, atol=1e-5)
    stored = archive.records(columns, [i])[0]
    assert stored == next(r for r in rows if r["id"] == columns["ids"][i])


def test_text_search_ranks_by_cosine_exact_or_forced(index, run, cli_in_process, tmp_path):
    from sarkit.search.archive import Archive

    proc = cli_in_process("search", index, "T72 main battle tank", "-k", "4", check=0)
    hits = hits_of(proc.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    archive = Archive.open(index)
    vectors, ids = archive.vectors(), archive.columns()["ids"].tolist()
    q = model_of(run).text_vector("T72 main battle tank")
    cos = vectors @ q
    best = np.argsort(-cos)[:4]
    assert [h["id"] for h in hits] == [ids[b] for b in best]
    np.testing.assert_allclose([h["score"] for h in hits], cos[best], atol=1e-5)
    assert all("texts" in h and "label" in h for h in hits)  # the records, passed through
    out = tmp_path / "hits.jsonl"
    cli_in_process("search", index, "T72 main battle tank", "-k", "4", "--exact", "-o", out,
                   check=0)  # fmt: skip
    assert hits_of(out.read_text()) == hits
    many = hits_of(cli_in_process("search", index, "tank", "-k", "50", check=0).stdout)
    assert len(many) == 10  # k beyond the archive: every tile once


def test_rerank_scores_itm_plus_cosine(index, run, cli_in_process):
    proc = cli_in_process("search", index, "BMP2 infantry fighting vehicle", "-k", "3",
                          "--rerank", "6", check=0)  # fmt: skip
    hits = hits_of(proc.stdout)
    assert len(hits) == 3 and all("itm" in h and "itc" in h for h in hits)
    for h in hits:
        assert h["score"] == pytest.approx(h["itm"] + h["itc"], abs=1e-5)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # the ITM logit is the retrieval head's for that pair
    from sarkit.tasks.vl.evaluate import itm_pair_logits

    model = model_of(run)
    top = hits[0]
    tile = model.tiles([{"id": "x", "path": top["path"]}], None)[0][0]
    with torch.no_grad():
        tokens = model.image_tokens(tile[None])
        enc = model.encode_text("BMP2 infantry fighting vehicle")
        logit = itm_pair_logits(model.lip, tokens, enc, torch.tensor([0]), torch.tensor([0]))
    assert top["itm"] == pytest.approx(float(logit[0]), abs=1e-4)


def test_like_a_tile_of_the_index_or_a_new_file(index, cli_in_process, tmp_path):
    from sarkit.search.archive import Archive

    archive = Archive.open(index)
    vectors, cols = archive.vectors(), archive.columns()
    ids = cols["ids"].tolist()
    proc = cli_in_process("search", index, "--like", ids[0], "-k", "3", check=0)
    hits = hits_of(proc.stdout)
    cos = vectors[1:] @ vectors[0]
    assert ids[0] not in [h["id"] for h in hits]  # the tile itself is no answer
    assert hits[0]["id"] == ids[1 + int(np.argmax(cos))]
    copy = tmp_path / "copy.jpeg"  # the same pixels, not in the index: embedded now
    shutil.copy(cols["paths"][2], copy)
    hits = hits_of(cli_in_process("search", index, "--like", copy, "-k", "2", check=0).stdout)
    assert hits[0]["id"] == ids[2] and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- georeferenced tiles


@pytest.fixture(scope="module")
def geo_index(run, tmp_path_factory) -> Path:
    """Six 64x64 uint8 GeoTIFFs in EPSG:4326 at three places (one rotated), georef'd."""
    from sarkit import cli

    root = tmp_path_factory.mktemp("geo")
    rng = np.random.default_rng(0)
    places = [(121.0, 31.5), (169.4, -19.5), (10.0, 50.0)]
    rows = []
    for i in range(6):
        lon, lat = places[i % 3]
        if i == 1:  # rotated 45 degrees
            transform = (
                Affine.translation(lon, lat) @ Affine.rotation(45) @ Affine.scale(1e-3, -1e-3)
            )
        else:
            transform = Affine(1e-3, 0, lon + 0.01 * i, 0, -1e-3, lat)
        path = write(root / f"t{i}.tif", rng.integers(1, 255, (64, 64), dtype=np.uint8),
                     crs="EPSG:4326", transform=transform)  # fmt: skip
        rows.append({"id": f"s/{'ML'[i % 2]}/t{i}", "path": str(path),
                     "sensor": ["umbra", "sentinel1"][i % 2], "scale": "ML"[i % 2]})  # fmt: skip
    write_jsonl(root / "tiles.jsonl", rows)
    assert cli.run(["-q", "georef", str(root / "tiles.jsonl"), "-o", str(root / "geo.jsonl"),
                    "--no-geocode"]) == 0  # fmt: skip
    out = root / "geo.index"
    assert cli.run(["-q", "embed", str(root / "geo.jsonl"), "--run", str(run), "-o", str(out),
                    "--backend", "faiss-ivf", "-j", "0"]) == 0  # fmt: skip
    return out


def test_filters_geojson_and_contact_sheet(geo_index, cli_in_process, tmp_path):
    from PIL import Image

    everything = hits_of(cli_in_process("search", geo_index, "a port", "-k", "10", check=0).stdout)
    assert len(everything) == 6
    box = "120.9,31.4,121.2,31.6"
    hits = hits_of(cli_in_process("search", geo_index, "a port", "--bbox", box, check=0).stdout)
    assert sorted(h["id"] for h in hits) == ["s/L/t3", "s/M/t0"]
    # the rotated tile near Tanna: its bounds reach the box's corner, its diamond does not
    corner = "169.40,-19.46,169.41,-19.455"
    hits = hits_of(cli_in_process("search", geo_index, "x", "--bbox", corner, check=0).stdout)
    assert [h["id"] for h in hits] == []
    near = "169.39,-19.501,169.41,-19.499"
    hits = hits_of(cli_in_process("search", geo_index, "x", "--bbox", near, check=0).stdout)
    assert [h["id"] for h in hits] == ["s/L/t1"]
    wrap = "169.0,-20,-170,-19"  # across the antimeridian
    hits = hits_of(cli_in_process("search", geo_index, "x", "--bbox", wrap, check=0).stdout)
    assert sorted(h["id"] for h in hits) == ["s/L/t1", "s/M/t4"]
    hits = hits_of(cli_in_process("search", geo_index, "x", "--sensor", "UMBRA", "--scale", "M",
                                  check=0).stdout)  # fmt: skip
    assert sorted(h["id"] for h in hits) == ["s/M/t0", "s/M/t2", "s/M/t4"]
    gj, png = tmp_path / "hits.geojson", tmp_path / "hits.png"
    proc = cli_in_process("search", geo_index, "a port", "-k", "4", "--exact", "--geojson", gj,
                          "--contact-sheet", png, check=0)  # fmt: skip
    hits = hits_of(proc.stdout)
    features = json.loads(gj.read_text())["features"]
    assert [f["properties"]["rank"] for f in features] == [1, 2, 3, 4]
    assert [f["properties"]["path"] for f in features] == [h["path"] for h in hits]
    assert [f["properties"]["score"] for f in features] == [h["score"] for h in hits]
    assert features[0]["geometry"]["coordinates"][0] == hits[0]["geo"]["footprint"]
    with Image.open(png) as im:
        assert im.size[0] > 4 * 100 and im.size[1] > 100


@pytest.mark.parametrize("kind", ["faiss-ivf", "faiss-ivfpq"])
def test_faiss_backends_match_exact_and_respect_filters(tmp_path, kind):
    from sarkit.errors import SarkitError
    from sarkit.search.backends import ExactSearcher, IVFBackend, IVFPQBackend, recall_at

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    x = centres[rng.integers(0, 40, 4000)] + 0.3 * rng.standard_normal((4000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[:50] + 0.1 * rng.standard_normal((50, 32)).astype(np.float32)
    backend = {"faiss-ivf": IVFBackend, "faiss-ivfpq": IVFPQBackend}[kind]()
    settings = backend.build(x, tmp_path / "ivf")
    files = {"faiss-ivf": ["assign.npy", "centroids.npy"], "faiss-ivfpq": ["ivfpq.faiss"]}
    assert settings["nlist"] > 1 and sorted(os.listdir(tmp_path / "ivf")) == files[kind]
    ivf = backend.open(x, tmp_path / "ivf", settings)
    truth = ExactSearcher(x).search(q, 10)[1]
    scores, idx = ivf.search(q, 10)
    assert recall_at(idx, truth) >= 0.9
    # the scores are the cosines of the hits, best first (re-scored on the stored floats)
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", x[idx], q), atol=1e-4)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    allowed = np.zeros(len(x), bool)
    allowed[::7] = True
    _, idx = ivf.search(q, 10, allowed)
    assert np.all(allowed[idx[idx >= 0]]) and (idx >= 0).mean() > 0.9
    with pytest.raises(SarkitError, match="does not fit|do not fit"):
        backend.open(x[:100], tmp_path / "ivf", settings)
    if kind == "faiss-ivfpq":
        assert settings["pq"] == "8x4" and settings["rerank_factor"] >= 2
        (tmp_path / "ivf" / "ivfpq.faiss").write_bytes(b"IwPQ junk")
        with pytest.raises(SarkitError, match="ivfpq.faiss: damaged faiss-ivfpq file"):
            backend.open(x, tmp_path / "ivf", settings)
        with pytest.raises(SarkitError, match="at least 256 vectors"):
            backend.build(x[:255], tmp_path / "small")


def test_nprobe_calibration_finds_the_smallest_passing_count(capsys):
    """x1.5 steps overshoot (364 fails, 546 passes at 1M vectors): the last step is halved
    until within ~6 % of the smallest count that reaches the target recall."""
    from sarkit.search.backends import TARGET_RECALL, calibrate_nprobe

    asked: list[int] = []

    def recall_of(nprobe: int) -> float:
        asked.append(nprobe)
        return TARGET_RECALL if nprobe >= 400 else TARGET_RECALL - 0.01

    got = calibrate_nprobe(recall_of, 2000, "test-index")
    assert 400 <= got <= 425 and len(asked) < 25
    assert "needs" not in capsys.readouterr().err  # 400 of 2,000: no warning
    assert calibrate_nprobe(recall_of, 2000, "test-index", warn_share=0.1) == got
    assert "test-index: recall@10 0.95 needs" in capsys.readouterr().err
    assert calibrate_nprobe(lambda p: 0.5, 30, "test-index") == 30
    assert "not reached even with all 30 lists" in capsys.readouterr().err
    assert calibrate_nprobe(lambda p: 1.0, 30, "test-index") == 1


def test_auto_builds_ivfpq_from_auto_min_and_search_uses_it(tmp_path, cli_in_process,
                                                            monkeypatch):  # fmt: skip
    """`embed --backend auto`'s choice by size (AUTO_MIN lowered to this archive's 600
    vectors), and `search --like` through the built faiss-ivfpq index: the exact answer."""
    from sarkit.search import backends
    from sarkit.search.archive import Archive
    from sarkit.search.embed import build_backend

    rng = np.random.default_rng(2)
    centres = rng.standard_normal((30, 16)).astype(np.float32)
    x = centres[rng.integers(0, 30, 600)] + 0.4 * rng.standard_normal((600, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    model = {"sha256": "0" * 64, "normalisation": "l2", "dim": 16, "run": None}
    out = tmp_path / "syn.index"
    archive = Archive.create_or_resume(out, model, 16)
    archive.append(x, [{"id": f"v{i}", "path": f"v{i}.tif"} for i in range(600)],
                   [f"/nowhere/v{i}.tif" for i in range(600)])  # fmt: skip
    monkeypatch.setattr(backends, "AUTO_MIN", 601)
    build_backend(archive)
    assert Archive.open(out).manifest["backend"]["name"] == "exact"
    monkeypatch.setattr(backends, "AUTO_MIN", 600)
    build_backend(archive)
    assert Archive.open(out).manifest["backend"]["name"] == "faiss-ivfpq"
    proc = cli_in_process("search", out, "--like", "v0", "-k", "5", check=0)
    assert "faiss-ivfpq (approximate)" in proc.stderr
    got = [h["id"] for h in hits_of(proc.stdout)]
    cos = x[1:] @ x[0]
    assert got[:3] == [f"v{1 + i}" for i in np.argsort(-cos)[:3]]
    exact = hits_of(cli_in_process("search", out, "--like", "v0", "-k", "5", "--exact",
                                   check=0).stdout)  # fmt: skip
    assert len(set(got) & {h["id"] for h in exact}) >= 4


def test_a_plugin_backend_is_used_by_name(recs, run, tmp_path, cli_in_process):
    from sarkit import plugins
    from sarkit.plugins import hookimpl
    from sarkit.search.backends import ExactBackend

    calls = []

    class Counting(ExactBackend):
        name = "counting"

        def open(self, vectors, folder, settings):
            calls.append(len(vectors))
            return super().open(vectors, folder, settings)

    class Plugin:
        @hookimpl
        def sarkit_index_backends(self):
            return [Counting()]

    pm = plugins.get_manager()
    pm.register(Plugin(), name="test-counting-backend")
    try:
        out = tmp_path / "c.index"
        cli_in_process("-q", "embed", recs, "--run", run, "-o", out, "--backend", "counting",
                       check=0)  # fmt: skip
        assert json.loads((out / "index.json").read_text())["backend"]["name"] == "counting"
        hits = hits_of(cli_in_process("search", out, "tank", "-k", "2", check=0).stdout)
        assert len(hits) == 2 and calls == [10]
    finally:
        pm.unregister(name="test-counting-backend")
    proc = cli_in_process("embed", recs, "--run", run, "-o", tmp_path / "d", "--backend", "nope")
    assert proc.returncode == 2 and "unknown index backend 'nope'" in proc.stderr


# ---------------------------------------------------------------- resuming


def test_resume_after_kill_embeds_no_tile_twice(run, recs, tmp_path, cli_in_process):
    rows = [json.loads(line) for line in recs.read_text().splitlines()]
    copies = [{**r, "id": f"{r['id']}#{k}"} for k in range(12) for r in rows]
    many = write_jsonl(tmp_path / "many.jsonl", copies)
    out = tmp_path / "k.index"
    cmd = [sys.executable, "-m", "sarkit", "-q", "embed", str(many), "--run", str(run),
           "-o", str(out), "-b", "1", "--chunk", "1", "-j", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "index.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(manifest.read_text()).get("count", 0) >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = json.loads(manifest.read_text())["count"]
    assert 3 <= before < 120, proc.stderr.read().decode()
    # the kill may land between a chunk's rename and the manifest's update: that complete
    # chunk (one record each, --chunk 1) is adopted too
    before = sum(1 for c in (out / "chunks").iterdir() if not c.name.startswith("."))
    # what a kill between a chunk's rename and the manifest leaves: a complete chunk the
    # manifest does not list (made here by dropping the last listed one), a half-written one
    m = json.loads(manifest.read_text())
    m["count"] -= m["chunks"].pop()["count"]
    manifest.write_text(json.dumps(m))
    (out / "chunks" / ".00999.partial").mkdir()
    res = cli_in_process("embed", many, "--run", run, "-o", out, check=0)
    from sarkit.search.archive import Archive

    ids = Archive.open(out).columns()["ids"].tolist()
    assert len(ids) == len(set(ids)) == 120
    assert not (out / "chunks" / ".00999.partial").exists()
    assert _count(res.stderr, "skipped: already in the index") == before  # adopted, not redone
    assert _count(res.stderr, "done") == 120 - before
    again = cli_in_process("embed", many, "--run", run, "-o", out, check=0)
    assert _count(again.stderr, "done") == 0


def test_embed_reads_records_on_stdin(run, recs, tmp_path, cli_in_process, monkeypatch):
    """`sarkit embed -`: a real pipe into a fresh process, tile paths relative to the working
    folder (stdin has no folder of its own), a damaged line named by its stdin line; the
    same records piped again resume (nothing embedded twice)."""
    import io

    from sarkit.search.archive import Archive

    rows = [json.loads(line) for line in recs.read_text().splitlines()][:4]
    root = shared("mstar")
    for r in rows:
        r["path"] = str(Path(r["path"]).relative_to(root))
    lines = [json.dumps(r) for r in rows[:2]] + ["{not json"] + [json.dumps(r) for r in rows[2:]]
    piped = "\n".join(lines) + "\n"
    out = tmp_path / "stdin.index"
    cmd = [sys.executable, "-m", "sarkit", "-q", "embed", "-", "--run", str(run), "-o", str(out),
           "-b", "2", "-j", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, input=piped, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # the damaged line is bad input
    assert "<stdin>:3: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    archive = Archive.open(out)
    cols = archive.columns()
    assert archive.count == 4 and sorted(cols["ids"]) == sorted(r["id"] for r in rows)
    by_id = dict(zip(cols["ids"].tolist(), cols["paths"].tolist(), strict=True))
    for r in rows:  # stored resolved, so a search from anywhere finds the tiles
        assert by_id[r["id"]] == str((root / r["path"]).resolve())
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped.encode())))
    again = cli_in_process("embed", "--run", run, "-o", out)  # no input file: stdin
    assert _count(again.stderr, "done") == 0
    assert _count(again.stderr, "skipped: already in the index") == 4


def _count(table: str, row: str) -> int:
    """The count of a row of a stage's summary table."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 2 and cells[0] == row:
            return int(cells[1])
    raise AssertionError(f"no row {row!r} in:\n{table}")


# ---------------------------------------------------------------- refusals and bad input


def test_another_model_is_refused(index, recs, tmp_path, cli_in_process):
    other = make_run(tmp_path / "other", seed=1)
    proc = cli_in_process("search", index, "tank", "--run", other)
    assert proc.returncode == 1
    assert "is not the model of" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""
    proc = cli_in_process("embed", recs, "--run", other, "-o", index)
    assert proc.returncode == 1 and "embedded with another model" in proc.stderr


def test_bad_input_is_one_line_and_writes_nothing(index, run, recs, tmp_path, cli_in_process):
    out = tmp_path / "hits.jsonl"

    def fails(code, *args, says):
        proc = cli_in_process(*args)
        assert proc.returncode == code, proc.stderr
        assert says in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists()
        return proc

    fails(1, "search", tmp_path / "none.index", "x", "-o", out, says="no such index")
    fake = tmp_path / "fake.index"
    fake.mkdir()
    fails(1, "search", fake, "x", "-o", out, says="not a sarkit index")
    damaged = tmp_path / "damaged.index"
    shutil.copytree(index, damaged)
    (damaged / "index.json").write_text('{"format": "sarkit-index/1", "dim"')
    fails(1, "search", damaged, "x", "-o", out, says="damaged index manifest")
    shutil.rmtree(damaged)
    shutil.copytree(index, damaged)
    (damaged / "chunks" / "00000" / "vectors.npy").write_bytes(b"\x93NUMPY junk")
    fails(1, "search", damaged, "x", "-o", out, says="vectors.npy: damaged")
    for bad in ("1,2,3", "a,b,c,d", "0,10,5,5", "0,0,200,1", "0,-91,1,1"):
        fails(2, "search", index, "x", "--bbox", bad, "-o", out, says="--bbox")
    fails(2, "search", index, "x", "-k", "0", "-o", out, says="-k")
    fails(2, "search", index, "-o", out, says="query TEXT or --like")
    fails(2, "search", index, "x", "--like", "y", "-o", out, says="one of the two")
    fails(2, "search", index, "--like", "y", "--rerank", "3", "-o", out, says="needs a query TEXT")
    fails(1, "search", index, "--like", "nowhere.tif", "-o", out, says="neither an id")
    fails(1, "embed", recs, "--run", tmp_path / "norun", "-o", tmp_path / "n.index",
          says="no such run folder")  # fmt: skip
    proc = fails(1, "embed", recs, "--run", run, "-o", tmp_path / "pq.index", "--backend",
                 "faiss-ivfpq", says="faiss-ivfpq backend needs at least 256 vectors")  # fmt: skip
    assert proc.stderr.count("error:") == 1 and "the tiles embedded are kept" in proc.stderr
    notdir = tmp_path / "file.index"
    notdir.write_text("x")
    fails(2, "embed", recs, "--run", run, "-o", notdir, says="expected a folder")


def test_records_without_path_or_unreadable_tiles_are_counted_and_skipped(
    run, recs, tmp_path, cli_in_process
):
    rows = [json.loads(line) for line in recs.read_text().splitlines()][:4]
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"not a jpeg")
    rows += [{"id": "nopath"}, {"id": "broken", "path": str(broken)},
             {"id": "gone", "path": str(tmp_path / "gone.tif")}]  # fmt: skip
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "b.index"
    proc = cli_in_process("embed", bad, "--run", run, "-o", out)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "bad.jsonl:5 (nopath)" in proc.stderr
    assert "broken" in proc.stderr and "gone" in proc.stderr
    assert _count(proc.stderr, "errors (bad input)") == 3
    from sarkit.search.archive import Archive

    assert Archive.open(out).count == 4


def test_bbox_parsing_and_the_polygon_test():
    from sarkit.errors import UsageError
    from sarkit.search.geo import in_bbox, parse_bbox

    assert parse_bbox(" 120.5, 30.5 ,122.5,32") == (120.5, 30.5, 122.5, 32.0)
    with pytest.raises(UsageError, match="4 numbers"):
        parse_bbox("1,2")
    with pytest.raises(UsageError, match="finite"):
        parse_bbox("nan,0,1,1")
    diamond = np.array([[[0, 1], [1, 0], [0, -1], [-1, 0], [0, 1]]], float)
    assert in_bbox(diamond, (0.2, 0.2, 0.4, 0.4)).tolist() == [True]
    assert in_bbox(diamond, (0.6, 0.6, 2, 2)).tolist() == [False]  # bounds meet, shape not
    assert in_bbox(diamond, (-3, -3, 3, 3)).tolist() == [True]  # the box holds it all
    assert in_bbox(np.full((1, 5, 2), np.nan), (-180, -90, 180, 90)).tolist() == [False]
