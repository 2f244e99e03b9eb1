"""caption on bad inputs: keys files, dead or malformed endpoints, tiles dropped by filter."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import sarkit
from rasters import speckle, write

from sarkit.llm.fakeserver import FakeChatServer

SECRET = "sk-raw-text-not-json-7c1d93"
NO_KEYS = {"SARKIT_API_KEY": "", "OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}


@pytest.fixture
def recs(tmp_path) -> Path:
    """Four records of one small made tile, in a JSON Lines file."""
    tile = write(tmp_path / "tile.tif", np.clip(speckle((64, 64)) * 90, 1, 255).astype(np.uint8))
    lines = [
        {"id": f"t{i}", "path": str(tile), "scene": "s.tif", "scale": "L", "pixel_m": 1.0}
        for i in range(4)
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def caption(recs, *args, env=None):
    base = ("caption", recs, "--task", "terrain", *args)
    return sarkit(*base, env={**NO_KEYS, **(env or {})})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (SECRET, "not valid JSON"),
        (json.dumps({"anthropic": SECRET}), 'no "openai" entry'),
        (json.dumps([SECRET]), "expected a JSON object"),
        (b"\xff\xfe" + SECRET.encode(), "not UTF-8"),
    ],
)
def test_a_bad_keys_file_is_an_error_before_any_request(recs, tmp_path, content, message):
    keys = tmp_path / "keys.json"
    keys.write_bytes(content if isinstance(content, bytes) else content.encode())
    with FakeChatServer() as server:
        proc = caption(recs, "--llm", "gpt-4.1", "--base-url", server.url, "--keys-file", keys)
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert f"{keys} (--keys-file): {message}" in proc.stderr
    assert SECRET not in proc.stderr and sum(server.requests.values()) == 0


def test_a_missing_or_folder_keys_file_is_named(recs, tmp_path):
    for path, message in ((tmp_path / "nope.json", "no such keys file"), (tmp_path, "a folder")):
        proc = caption(recs, "--llm", "gpt-4.1", "--keys-file", path)
        assert proc.returncode == 1 and f"{path} (--keys-file)" in proc.stderr
        assert message in proc.stderr
    # a keys file named by the variable but not there yet: where the key was looked for
    env = {"SARKIT_KEYS_FILE": str(tmp_path / "gone.json")}
    proc = caption(recs, "--llm", "gpt-4.1", env=env)
    assert proc.returncode == 1 and "needs an API key" in proc.stderr
    assert str(tmp_path / "gone.json") in proc.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_dead_endpoint_stops_the_run_at_once(recs, tmp_path):
    lines = recs.read_text().splitlines() * 4  # 16 tiles
    many = tmp_path / "many.jsonl"
    many.write_text(
        "".join(
            json.dumps({**json.loads(line), "id": f"t{i}"}) + "\n" for i, line in enumerate(lines)
        )
    )
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    journal = tmp_path / "run.journal"
    start = time.monotonic()
    proc = caption(many, "--llm", "local", "--base-url", url, "--journal", journal, "-j", "4")
    took = time.monotonic() - start
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert took < 20, f"{took:.0f} s against a closed port"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert url in errors[0] and "cannot connect" in errors[0] and str(journal) in errors[0]


@pytest.mark.parametrize("url", ["localhost:8000/v1", "ftp://example.org/v1", "http://"])
def test_a_base_url_without_http_scheme_is_a_usage_error(recs, url):
    proc = caption(recs, "--llm", "local", "--base-url", url)
    assert proc.returncode == 2 and f"--base-url '{url}'" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_records_dropped_by_filter_pass_through_uncaptioned(recs, tmp_path):
    rows = [json.loads(line) for line in recs.read_text().splitlines()]
    rows[1]["quality"] = {"keep": False, "reason": "constant"}
    rows[2]["quality"] = {"keep": False, "reason": "nodata"}
    rows[3]["quality"] = {"keep": True}
    rows[3]["parent"] = "t2"  # its parent was dropped: captioned without context
    marked = tmp_path / "marked.jsonl"
    marked.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeChatServer() as server:
        proc = caption(marked, "--llm", "local", "--base-url", server.url)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in out] == ["t0", "t1", "t2", "t3"]  # input order kept
    assert out[1] == rows[1] and out[2] == rows[2]  # unchanged: no texts, no caption
    assert "texts" in out[0] and "texts" in out[3]
    assert "parent t2 was dropped by filter" in out[3]["caption"]["context_note"]
    assert sorted(server.requests) == ["t0", "t3"]
    assert re.search(r"skipped: dropped by filter\s*│\s*2 ", proc.stderr), proc.stderr
    # every record dropped: all passed through, nothing sent
    for row in rows:
        row["quality"] = {"keep": False}
    marked.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeChatServer() as server:
        proc = caption(marked, "--llm", "local", "--base-url", server.url)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 4
    assert sum(server.requests.values()) == 0
