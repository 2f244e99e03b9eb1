from conftest import sarkit

from sarkit import __version__


def test_version_and_help():
    assert sarkit("--version", check=0).stdout.strip() == f"sarkit {__version__}"
    out = sarkit("--help", check=0).stdout
    assert "plugins" in out


def test_usage_error_exits_2_without_traceback():
    proc = sarkit("no-such-command")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "No such command" in proc.stderr


def test_bad_input_is_one_line_exit_1_and_debug_shows_traceback(tmp_path):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"id": "x", "path": "nowhere.tif"}\n')
    proc = sarkit("georef", bad)
    assert proc.returncode == 1 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}:1: x: tile file nowhere.tif not found"]
    assert "Traceback" not in proc.stderr
    missing = sarkit("georef", tmp_path / "absent.jsonl")
    assert missing.returncode == 1 and "absent.jsonl: no such file" in missing.stderr
    # a bad output ends the run: one line, or its traceback under --debug
    plain = sarkit("georef", bad, "-o", tmp_path)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = sarkit("georef", bad, "-o", tmp_path, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_quiet_silences_summaries_but_not_errors(tmp_path):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"id": "x", "path": "nowhere.tif"}\n')
    proc = sarkit("--quiet", "georef", bad)
    assert "outcome" not in proc.stderr and "not found" in proc.stderr
    proc = sarkit("georef", bad, "-q")
    assert "outcome" not in proc.stderr and "not found" in proc.stderr
