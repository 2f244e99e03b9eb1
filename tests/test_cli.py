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
