"""What a tile was cut from and how, so a rerun reuses only tiles it would write the same.

A tile file's name says only scene stem, scale and grid cell: a rerun with another ground
size or quantiser, or another scene of the same file name, finds files under the same
names. Each tile carries a digest of everything that decides its bytes (scene identity,
band, the window plan's inputs, radiometry, nodata rule, quantiser and its fitted
parameters, format options); a tile is reused only when its digest matches. One output
folder holds one scene per stem: a marker beside its tiles names the scene that owns them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sarkit.atomic import write_text
from sarkit.errors import SarkitError

TAG = "SARKIT_PROVENANCE"
MARKER = ".sarkit-scene.json"
FORMAT = 1  #: bump when the tile encoding changes what a reader sees


def scene_identity(path: Path) -> dict[str, Any]:
    """Where the scene is and which version of it (size and modification time)."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def digest(facts: dict[str, Any]) -> str:
    """A stable digest of `facts` (keys sorted; floats by repr, so 1e-3 != 0.001000001)."""
    text = json.dumps({"format": FORMAT, **facts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def claim(folder: Path, scene: Path, run_id: str, overwrite: bool) -> None:
    """Make `folder` (the scene's tile folder) this scene's, or refuse when another scene
    owns it: two scenes of one file name would share ids and tile paths.

    A scene claimed earlier in the same run is never displaced; one from an earlier run
    is with --overwrite (its tiles are rewritten for the new scene)."""
    marker = folder / MARKER
    mine = str(Path(scene).resolve())
    owner: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        owner = json.loads(marker.read_text(encoding="utf-8"))
    other = owner.get("scene") if isinstance(owner, dict) else None
    if isinstance(other, str) and other != mine:
        same_run = owner.get("run") == run_id
        if same_run or not overwrite:
            hint = (
                "two scenes of this run have the same file name"
                if same_run
                else "rerun with --overwrite to replace them"
            )
            raise SarkitError(
                f"{scene}: {folder} already holds the tiles of another scene with the same "
                f"file name ({other}); slice it into another --out folder or rename it "
                f"({hint})"
            )
    if other != mine or owner.get("run") != run_id:
        write_text(marker, json.dumps({"scene": mine, "run": run_id}) + "\n")
