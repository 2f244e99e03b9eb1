"""Checks that a stage's outputs can be written, made before any work starts.

Without them an unwritable output (a read-only file system, a path under a regular file, a
folder where a file is expected) shows up at the end of the run, after the tiles were cut
or the model loaded, as an error about a hidden temporary file. A check creates nothing
but a probe file it removes at once, in the nearest folder that exists.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from sarkit.errors import OutputError, UsageError


def _nearest_existing(path: Path) -> Path:
    for folder in (path, *path.parents):
        if folder.exists():
            return folder
    return Path(".")


def _probe(folder: Path, shown: str) -> None:
    """Create and remove a file in `folder`: the one check that read-only mounts and ACLs
    cannot fool (as root, access() says yes to almost anything)."""
    probe = folder / f".sarkit-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        where = "" if str(folder) == shown else f" in {folder}"
        raise OutputError(
            exc.errno or 0, f"{shown}: cannot write{where} ({exc.strerror})"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        probe.unlink()


def check_folder(path: str | os.PathLike, option: str) -> None:
    """An output folder: an existing folder, or one that can be made, where files can be
    written."""
    folder = Path(path)
    shown = f"{path} ({option})"
    base = _nearest_existing(folder)
    if not base.is_dir():
        what = "is a file" if base == folder else f"is under {base}, a regular file"
        raise UsageError(f"{shown}: {what}, expected a folder")
    _probe(base, shown)


def check_file(path: str | os.PathLike | None, option: str, append: bool = False) -> None:
    """An output file (None or "-": stdout, nothing to check): not a folder, not under a
    regular file, in a folder that takes new files; with `append`, an existing file must
    open for appending."""
    if path is None or str(path) == "-":
        return
    target = Path(path)
    shown = f"{path} ({option})"
    if target.is_dir():
        raise UsageError(f"{shown}: is a folder, expected a file name")
    base = _nearest_existing(target.parent)
    if not base.is_dir():
        raise UsageError(f"{shown}: is under {base}, a regular file, not a folder")
    _probe(base, shown)
    if append and target.exists():
        try:
            with open(target, "ab"):
                pass
        except OSError as exc:
            raise OutputError(exc.errno or 0, f"{shown}: cannot append ({exc.strerror})") from None


RUN_MARKERS = ("model.json", "config.json", "checkpoints")


def check_new_run(path: str | os.PathLike, resume: str | None) -> None:
    """A training run into a folder that already holds one continues it (`--resume`) or
    stops: starting afresh there would overwrite its weights, checkpoints and metrics."""
    folder = Path(path)
    if resume or not folder.is_dir():
        return
    held = [name for name in RUN_MARKERS if (folder / name).exists()]
    if held:
        raise UsageError(
            f"-o {path}: already holds a run ({', '.join(held)}); pass --resume latest to "
            "continue it, or another -o (delete the folder to start over)"
        )
