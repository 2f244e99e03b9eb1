"""The openai backend against a real local HTTP server speaking chat completions, with faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sarkit, shared

from sarkit.caption import CaptionOptions
from sarkit.caption.chain import caption_records
from sarkit.llm.fakeserver import FakeChatServer
from sarkit.report import Report

KEY = "sk-test-3f9a1c7e5b2d4680"


@pytest.fixture(scope="module")
def tile(tmp_path_factory) -> Path:
    """A 256-pixel crop of the real Umbra scene (small: the PNG encodes fast)."""
    import rasterio
    from rasterio.windows import Window

    scene = shared("scenes", "umbra_yasur", "umbra_mount_yasur.tiff")
    path = tmp_path_factory.mktemp("tiles") / "crop.tif"
    with rasterio.open(scene) as src:
        data = src.read(1, window=Window(900, 900, 256, 256))
    with rasterio.open(
        path, "w", driver="GTiff", width=256, height=256, count=1, dtype="uint8"
    ) as dst:
        dst.write(data, 1)
    return path


def records(tile: Path, n: int, chain: bool = False) -> list[dict]:
    out = []
    for i in range(n):
        parent = f"t{i - 1:02d}" if chain and i % 3 else None
        out.append(
            {
                "id": f"t{i:02d}",
                "path": str(tile),
                "scene": "umbra.tif",
                "scale": ("L", "M", "S")[i % 3] if chain else "L",
                "parent": parent,
                "window": [0, 0, 256, 256],
                "pixel_m": 0.59,
                "ground_m": 151,
                "sensor": "umbra",
                "band": "X",
                "polarization": "VV",
                "nodata_frac": 0.0,
                "geo": {
                    "center": [169.449, -19.527],
                    "footprint": [],
                    "place": {
                        "name": "Isangel",
                        "admin1": "Tafea",
                        "country": "VU",
                        "distance_km": 19.3,
                    },
                },
            }
        )
    return out


def write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def run(recs, server, **opts):
    report = Report("caption")
    options = CaptionOptions(
        llm=opts.pop("llm", "local"), base_url=server.url, task="terrain", **opts
    )
    return list(caption_records(iter(recs), options, report)), report


def test_faults_are_retried_repaired_or_failed_and_the_key_never_leaks(tile, tmp_path):
    plan = {
        "t00": ["429"],  # Retry-After: 1
        "t01": ["500", "500"],
        "t02": ["slow"],  # past the 1 s timeout
        "t03": ["malformed"],
        "t04": ["missing"],  # then one repair request
        "t05": ["drop"],
        "t06": ["missing", "missing"],  # the repair is incomplete too: failed
        "t07": ["500", "500", "500", "500"],  # more than --retries 2: failed
    }
    server = FakeChatServer(plan=plan, retry_after="1", slow_s=2.0, api_key=KEY).start()
    try:
        src = write(tmp_path / "in.jsonl", records(tile, 9))
        journal = tmp_path / "run.journal"
        proc = sarkit(
            "--debug",
            "caption",
            src,
            "--llm",
            "gpt-4.1",
            "--base-url",
            server.url,
            "--task",
            "terrain",
            "--timeout",
            "1",
            "--retries",
            "2",
            "-j",
            "4",
            "--journal",
            journal,
            env={"SARKIT_API_KEY": KEY, "OPENAI_API_KEY": ""},
        )
    finally:
        server.stop()
    assert proc.returncode == 1, proc.stderr[-3000:]  # two failed: reported after all output
    assert len(proc.stdout.splitlines()) == 9, proc.stderr[-3000:]
    out = {r["id"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert sorted(out) == [f"t{i:02d}" for i in range(9)]
    for rid in ("t00", "t01", "t02", "t03", "t04", "t05", "t08"):
        texts = out[rid]["texts"]
        assert len(texts) == 8 and all(f"of tile {rid}" in v for v in texts.values()), rid
        cap = out[rid]["caption"]
        assert cap["tokens_in"] > 0 and cap["tokens_out"] > 0 and cap["cost"] > 0
        assert cap["model"] == "gpt-4.1" and len(cap["prompt_sha256"]) == 64
    assert server.requests["t00"] == 2 and server.requests["t01"] == 3
    assert server.requests["t02"] == 2 and server.requests["t03"] == 2
    assert server.requests["t05"] == 2 and server.requests["t08"] == 1
    assert server.requests["t04"] == 2 and out["t04"]["caption"]["repaired"] is True
    assert out["t00"]["caption"]["attempts"] == 2 and out["t01"]["caption"]["attempts"] == 3
    # Retry-After honoured: the second try of t00 came at least 1 s after the 429
    times = [t for t, tile_id, _ in server.events if tile_id == "t00"]
    assert times[1] - times[0] >= 1.0
    assert "missing or empty fields" in out["t06"]["caption"]["failed"]
    assert "texts" not in out["t06"] and server.requests["t06"] == 2
    assert "gave up after 3 attempts: HTTP 500" in out["t07"]["caption"]["failed"]
    assert "t06: caption failed" in proc.stderr and "t07: caption failed" in proc.stderr
    # the schema was sent and the image went as a PNG data URL; the key only in the header
    body = server.bodies[0]
    assert body["response_format"]["json_schema"]["schema"]["required"][0] == "Terrain"
    image = body["messages"][1]["content"][1]["image_url"]["url"]
    assert image.startswith("data:image/png;base64,")
    assert server.seen_auth == {f"Bearer {KEY}"}
    for text in (proc.stdout, proc.stderr, journal.read_text()):
        assert KEY not in text and KEY[3:15] not in text


def test_server_without_json_schema_gets_labelled_lines(tile):
    with FakeChatServer(schema=False) as server:
        out, report = run(records(tile, 3), server, llm="local")
    assert report.done == 3 and not report.errors
    assert all(len(r["texts"]) == 8 for r in out)
    assert out[0]["texts"]["Water"] == "Water of tile t00: statement 8 about the SAR tile."
    assert sum(server.requests.values()) == 3  # one rejected schema request, then none
    assert "response_format" not in server.bodies[-1]


def test_chain_sends_parent_text_and_max_cost_stops_before_exceeding(tile, tmp_path):
    with FakeChatServer() as server:
        out, report = run(records(tile, 6, chain=True), server, llm="gpt-4.1", concurrency=2)
    assert report.done == 6
    prompts = {}
    for body in server.bodies:
        text = body["messages"][1]["content"][0]["text"]
        prompts[text.split("Tile ")[1].split(" ")[0]] = text
    assert "Terrain of tile t00" in prompts["t01"] and "Terrain of tile t01" in prompts["t02"]
    assert "Terrain of tile" not in prompts["t00"]
    per_tile = out[0]["caption"]["cost"]

    # a budget for about two and a half tiles' worst case: stops cleanly, never above it
    budget = 2.5 * per_tile * 3
    with FakeChatServer() as server:
        out, report = run(
            records(tile, 6),
            server,
            llm="gpt-4.1",
            concurrency=1,
            max_cost=budget,
            journal=str(tmp_path / "j"),
        )
    spent = sum(r["caption"]["cost"] for r in out)
    assert 0 < len(out) < 6 and spent <= budget
    assert any("--max-cost" in e and "rerun with --journal" in e for e in report.errors)
    assert sum(server.requests.values()) == len(out)


def test_missing_key_refused_key_and_keys_file(tile, tmp_path):
    src = write(tmp_path / "in.jsonl", records(tile, 1))
    env = {
        "SARKIT_API_KEY": "",
        "OPENAI_API_KEY": "",
        "OPENAI_BASE_URL": "",
        "SARKIT_KEYS_FILE": str(tmp_path / "none.json"),
    }
    proc = sarkit("caption", src, "--llm", "gpt-4.1", env=env)
    assert proc.returncode == 1 and "needs an API key" in proc.stderr and proc.stdout == ""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"openai": KEY}))
    with FakeChatServer(api_key=KEY) as server:
        ok = sarkit(
            "caption",
            src,
            "--llm",
            "gpt-4.1",
            "--base-url",
            server.url,
            "--keys-file",
            keys,
            "--task",
            "terrain",
            env=env,
        )
        assert ok.returncode == 0, ok.stderr
        refused = sarkit(
            "caption",
            src,
            "--llm",
            "gpt-4.1",
            "--base-url",
            server.url,
            "--task",
            "terrain",
            env={**env, "OPENAI_API_KEY": "sk-wrong-key"},
        )
    assert refused.returncode == 1 and "refused the API key (HTTP 401)" in refused.stderr
    assert "sk-wrong-key" not in refused.stderr + refused.stdout
    assert len(ok.stdout.splitlines()) == 1


def _default_sigint() -> None:
    """A terminal's Ctrl-C reaches a foreground job; a suite started in the background
    (`cmd &` without job control, nohup) passes SIGINT down ignored, and Python keeps it
    ignored, so the Ctrl-C test would time its run out instead of interrupting it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(args, env):
    return subprocess.Popen(
        [sys.executable, "-m", "sarkit", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        preexec_fn=_default_sigint,
    )


def _wait_for_lines(path: Path, n: int, proc, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n} entries")


def test_kill_9_then_rerun_captions_every_tile_exactly_once(tile, tmp_path):
    recs = records(tile, 24, chain=True)
    src = write(tmp_path / "in.jsonl", recs)
    journal = tmp_path / "run.journal"
    env = {"SARKIT_API_KEY": KEY}
    with FakeChatServer(latency=0.15, api_key=KEY) as server:
        args = [
            "caption",
            src,
            "--llm",
            "local",
            "--base-url",
            server.url,
            "--task",
            "terrain",
            "-j",
            "4",
            "--journal",
            journal,
        ]
        proc = _popen([*args, "-o", tmp_path / "first.jsonl"], env)
        _wait_for_lines(journal, 7, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        before = {json.loads(x)["id"] for x in journal.read_text().splitlines() if x.strip()}
        asked_before = dict(server.requests)
        assert 7 <= len(before) < 24 and not (tmp_path / "first.jsonl").exists()
        rerun = sarkit(*args, "-o", tmp_path / "out.jsonl", env=env)
    assert rerun.returncode == 0, rerun.stderr
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == [r["id"] for r in recs]  # each once, in input order
    assert all(len(r["texts"]) == 8 for r in out)
    entries = [json.loads(x) for x in journal.read_text().splitlines() if x.strip()]
    assert len(entries) == 24 and len({e["key"] for e in entries}) == 24
    for rid in before:  # journaled before the kill: never asked again
        assert server.requests[rid] == asked_before[rid]
    for r in out:  # children were prompted with their parent's (journaled) text
        if r["parent"]:
            assert r["caption"]["context"] == r["parent"]
    assert "from journal" in rerun.stderr


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tile, tmp_path):
    # 80 tiles at 0.2 s a request on 2 threads: some 8 s of run, a margin for the signal to
    # land mid-run on a loaded machine (the child's SIGINT is made default: _popen)
    src = write(tmp_path / "in.jsonl", records(tile, 80))
    journal = tmp_path / "run.journal"
    with FakeChatServer(latency=0.2) as server:
        args = [
            "caption",
            src,
            "--llm",
            "local",
            "--base-url",
            server.url,
            "--task",
            "terrain",
            "-j",
            "2",
            "--journal",
            journal,
        ]
        proc = _popen(args, {})
        _wait_for_lines(journal, 3, proc)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, "ended before the signal" if proc.returncode == 0 else stderr
        assert "interrupted" in stderr and "rerun the same command to resume" in stderr
        assert "Traceback" not in stderr
        first = [json.loads(x)["id"] for x in stdout.splitlines()]
        rerun = sarkit(*args, env={})
    assert rerun.returncode == 0, rerun.stderr
    ids = [json.loads(x)["id"] for x in rerun.stdout.splitlines()]
    assert len(ids) == 80 and len(set(ids)) == 80 and set(first) <= set(ids)
