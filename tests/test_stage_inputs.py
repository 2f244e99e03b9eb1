"""Bad input the record stages share: damaged streams, missing files, unwritable outputs,
option values out of range, duplicate ids, tile paths that are no tile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import sarkit
from rasters import speckle, write

NO_KEYS = {"SARKIT_API_KEY": "", "OPENAI_API_KEY": "", "SARKIT_KEYS_FILE": "/nonexistent"}


def lines_of(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> list[dict]:
    """Four real slice records (georeferenced uint8 tiles with contrast)."""
    tmp = tmp_path_factory.mktemp("scene")
    scene = write(tmp / "s.tif", speckle((128, 128), seed=5))
    return lines_of(sarkit("-q", "slice", scene, "-o", tmp / "t", "-g", "128", check=0))


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


STAGES = [
    ("georef", ("--no-geocode",)),
    ("filter", ("--mark", "--disable", "knn", "-j", "1")),
    ("caption", ("--llm", "offline", "--task", "terrain")),
]


# ---------------------------------------------------------------- damaged streams, files


@pytest.mark.parametrize(("stage", "args"), STAGES)
def test_damaged_lines_and_missing_files_cost_only_themselves(tmp_path, tiles, stage, args):
    first = tmp_path / "a.jsonl"
    body = "".join(json.dumps(r) + "\n" for r in tiles[:2]).encode()
    first.write_bytes(b"\xef\xbb\xbf" + body + b'{"id": "bad\xff"}\n')  # BOM, a bad byte
    second = jsonl(tmp_path / "b.jsonl", tiles[2:])
    out = tmp_path / "out.jsonl"
    proc = sarkit(stage, first, tmp_path / "gone.jsonl", second, "-o", out, *args, env=NO_KEYS)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "internal error" not in proc.stderr
    assert [r["id"] for r in lines_of(type("P", (), {"stdout": out.read_text()}))] == [
        r["id"] for r in tiles
    ]
    assert f"{first}:3: not valid UTF-8" in proc.stderr
    assert f"{tmp_path / 'gone.jsonl'}: no such file" in proc.stderr


@pytest.mark.parametrize(("stage", "args"), STAGES)
def test_duplicate_ids_are_reported_where_first_seen(tmp_path, tiles, stage, args):
    src = jsonl(tmp_path / "in.jsonl", [tiles[0], tiles[1], tiles[0]])
    proc = sarkit(stage, src, *args, env=NO_KEYS)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [r["id"] for r in lines_of(proc)] == [tiles[0]["id"], tiles[1]["id"]]
    assert tiles[0]["id"] in proc.stderr and "duplicate" in proc.stderr


@pytest.mark.parametrize(("stage", "args"), STAGES)
def test_a_tile_path_that_is_no_file_is_named_for_what_it_is(tmp_path, tiles, stage, args):
    rows = [
        {**tiles[0], "id": "folder", "path": str(tmp_path)},
        {**tiles[0], "id": "number", "path": 123},
        {**tiles[0], "id": "empty", "path": ""},
        tiles[1],
    ]
    proc = sarkit(stage, jsonl(tmp_path / "in.jsonl", rows), *args, env=NO_KEYS)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    kept = [r["id"] for r in lines_of(proc) if "failed" not in r.get("caption", {})]
    assert tiles[1]["id"] in kept and "number" not in kept and "empty" not in kept
    err = proc.stderr
    assert "folder" in err and "is a folder" in err and "not found" not in err
    assert "'path' must be a file path (a string), not int" in err
    assert "'path' is empty" in err


# ---------------------------------------------------------------- unwritable outputs


def _under_a_file(tmp_path: Path) -> Path:
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file\n")
    return blocker / "out.jsonl"


@pytest.mark.parametrize(
    ("stage", "option", "args"),
    [
        ("georef", "-o", ("--no-geocode",)),
        ("georef", "--geojson", ("--no-geocode",)),
        ("filter", "-o", ("-j", "1")),
        ("filter", "--report", ("-j", "1")),
        ("caption", "-o", ("--llm", "offline")),
        ("caption", "--journal", ("--llm", "offline")),
    ],
)
def test_unwritable_outputs_are_named_before_any_work(tmp_path, tiles, stage, option, args):
    src = jsonl(tmp_path / "in.jsonl", tiles)
    for target, exit_code, message in (
        (_under_a_file(tmp_path), 2, "is under"),
        (tmp_path, 2, "is a folder"),
    ):
        proc = sarkit(stage, src, option, target, *args, env=NO_KEYS)
        assert proc.returncode == exit_code, proc.stderr
        assert proc.stdout == "" and "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(target) in errors[0] and message in errors[0]
        assert ".part" not in proc.stderr and "internal error" not in proc.stderr


def test_slice_outputs_are_checked_before_any_tile(tmp_path):
    scene = write(tmp_path / "s.tif", speckle((64, 64)))
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    for args, named in (
        (("-o", blocker), blocker),
        (("-o", blocker / "tiles"), blocker / "tiles"),
        (("-o", tmp_path / "t", "--records", tmp_path), tmp_path),
        (("-o", tmp_path / "t", "--records", blocker / "r.jsonl"), blocker / "r.jsonl"),
    ):
        proc = sarkit("slice", scene, *args, "-g", "64")
        assert proc.returncode == 2 and str(named) in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert not (tmp_path / "t").exists(), "no tile was cut before the check"


def test_a_read_only_mount_is_named(tmp_path):
    """A real read-only file system (root ignores chmod): a bind mount, where allowed."""
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)])
    if made.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (not root, or no mount permission)")
    try:
        scene = write(tmp_path / "s.tif", speckle((64, 64)))
        proc = sarkit("slice", scene, "-o", ro / "tiles", "-g", "64")
        assert proc.returncode == 1 and "Read-only file system" in proc.stderr
        assert f"{ro / 'tiles'} (--out)" in proc.stderr and "Traceback" not in proc.stderr
        src = jsonl(tmp_path / "in.jsonl", [{"id": "a", "path": str(scene)}])
        proc = sarkit("georef", src, "-o", ro / "out.jsonl", "--no-geocode")
        assert proc.returncode == 1 and f"{ro / 'out.jsonl'} (--output)" in proc.stderr
    finally:
        subprocess.run(["umount", str(ro)])


def test_a_failed_contact_sheet_keeps_the_records(tmp_path, tiles, monkeypatch):
    """--report fails only at the end (the folder became unwritable): records still written."""
    from sarkit import cli
    from sarkit.quality import report as sheet_module

    def fail(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sheet_module.ContactSheet, "save", fail)
    src = jsonl(tmp_path / "in.jsonl", tiles)
    out = tmp_path / "out.jsonl"
    sheet = tmp_path / "s.png"
    code = cli.run(["-q", "filter", str(src), "-o", str(out), "--mark", "--report", str(sheet)])
    assert code == 1 and not sheet.exists()
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [
        r["id"] for r in tiles
    ]


# ---------------------------------------------------------------- numeric options


@pytest.mark.parametrize(
    "args",
    [
        ("slice", "s.tif", "-o", "t", "--ground-size", "nan"),
        ("slice", "s.tif", "-o", "t", "--ground-size", "inf"),
        ("slice", "s.tif", "-o", "t", "--pixel-size", "0"),
        ("slice", "s.tif", "-o", "t", "--pixel-size", "-10"),
        ("slice", "s.tif", "-o", "t", "--max-nodata", "-1"),
        ("slice", "s.tif", "-o", "t", "--min-coverage", "2"),
        ("slice", "s.tif", "-o", "t", "--min-coverage", "nan"),
        ("filter", "--max-nodata", "1.5"),
        ("filter", "--min-score", "nan"),
        ("filter", "--min-std", "-1"),
        ("caption", "--max-cost", "-5"),
        ("caption", "--image-size", "0"),
        ("caption", "--timeout", "0"),
        ("caption", "--concurrency", "0"),
        ("caption", "--retries", "-1"),
    ],
)
def test_numeric_options_out_of_range_exit_2_naming_the_range(tmp_path, args):
    proc = sarkit(*args, cwd=tmp_path, input="")
    assert proc.returncode == 2, proc.stderr
    option = next(a for a in args if a.startswith("--"))
    assert option in proc.stderr and "Traceback" not in proc.stderr
    says = ("is not in the range", "greater than", "less than", "positive finite")
    assert any(text in proc.stderr for text in says), proc.stderr


def test_offline_dry_run_at_the_smallest_image_size(tmp_path, tiles):
    src = jsonl(tmp_path / "in.jsonl", tiles[:1])
    proc = sarkit("caption", src, "--dry-run", "--image-size", "32", "--task", "terrain")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr


def test_stdout_carries_records_only(tmp_path, tiles):
    src = jsonl(tmp_path / "in.jsonl", tiles)
    for stage, args in STAGES:
        proc = sarkit(stage, src, *args, env=NO_KEYS, check=0)
        assert all(isinstance(json.loads(line), dict) for line in proc.stdout.splitlines())
    proc = sarkit("caption", src, "--dry-run", "--task", "terrain", check=0)
    assert proc.stdout == "", "a dry run shows its prompts on stderr"


def test_an_all_zero_uint8_tile_is_not_a_crash(tmp_path):
    zero = write(tmp_path / "z.tif", np.zeros((64, 64), np.uint8))
    src = jsonl(tmp_path / "in.jsonl", [{"id": "z", "path": str(zero)}])
    proc = sarkit("filter", src, "--mark", "-j", "1")
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr


def test_library_prints_during_a_stage_go_to_stderr(tmp_path, tiles):
    """A library that prints (Python print, or a C write to descriptor 1) mid-stage."""
    import subprocess
    import sys

    src = jsonl(tmp_path / "in.jsonl", tiles)
    code = (
        "import os, sys\n"
        "import sarkit.raster.georef as g\n"
        "real = g.georeference\n"
        "def noisy(record, options):\n"
        "    print('python noise'); os.write(1, b'C noise\\n')\n"
        "    return real(record, options)\n"
        "g.georeference = noisy\n"
        "from sarkit.cli import run\n"
        f"sys.exit(run(['georef', {str(src)!r}, '--no-geocode']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["id"] for line in proc.stdout.splitlines()] == [r["id"] for r in tiles]
    assert proc.stderr.count("python noise") == 4 and proc.stderr.count("C noise") == 4
