"""Shared fixtures: run the real CLI, locate the shared real data, make tiny rasters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SARKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real SAR data not found at {path} (set SARKIT_SHARED_DATA)")
    return path


def sarkit(*args: str, input: str | None = None, cwd: Path | None = None, env=None, check=None):
    """Run `python -m sarkit ARGS` as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "sarkit", *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=900,  # the MSTAR learning run takes 9 min on a loaded 2-core machine
    )
    if check is not None and proc.returncode != check:
        raise AssertionError(
            f"sarkit {' '.join(map(str, args))} exited {proc.returncode}, expected {check}\n"
            f"stderr:\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def cli():
    return sarkit
