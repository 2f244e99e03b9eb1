"""Atomic file writes: a reader never sees a half-written file under its final name."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from sarkit.errors import OutputError

IOV_BATCH = 512  # buffers per writev call (the system's IOV_MAX is at least 1024)


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new file beside `path` (same filesystem, so rename is atomic), open for writing.

    Created with mode 0666 less the umask, like any file the user writes (mkstemp's 0600
    would hide every tile from the rest of a cluster group); O_EXCL: never someone else's.
    """
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.part"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[tuple[int, Path]]:
    """A new temporary file beside `path`, open as a descriptor the block must close: renamed
    onto `path` when the block succeeds, removed when it fails. The folder is made only when
    it is missing (one mkdir per tile would cost the slicer a syscall and an exception)."""
    final = Path(path)
    try:
        try:
            fd, tmp = _create_temp(final)
        except FileNotFoundError:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = _create_temp(final)
    except OSError as exc:
        raise _output_error(final, exc) from None
    try:
        yield fd, tmp
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            if exc.filename in (None, str(tmp)):  # the output's own failure, not an input's
                raise _output_error(final, exc) from None
        raise


def _output_error(final: Path, exc: OSError) -> OutputError:
    """One line naming the file the user asked for (not the hidden temporary one)."""
    reason = exc.strerror or type(exc).__name__
    if isinstance(exc, (NotADirectoryError, FileExistsError)) and not final.parent.is_dir():
        reason = "a path under a regular file"
    elif isinstance(exc, IsADirectoryError) or final.is_dir():
        reason = "is a folder, expected a file"
    return OutputError(exc.errno or 0, f"{final}: cannot write ({reason})")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed onto `path`, else removed.

    The rename alone guarantees that no reader (or rerun) sees a half-written file after a
    crash of the process; `fsync` also makes the content durable against power loss before
    the rename, at the cost of a disk flush per file (too slow for thousands of tiles, whose
    readers check them on resume instead).
    """
    with _replacing(path) as (fd, tmp):
        os.close(fd)
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", fsync: bool = True, **kwargs
) -> Iterator[IO]:
    """Open a temporary file for writing that replaces `path` only when the block succeeds."""
    with atomic_path(path, fsync) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        fh.flush()


def write_chunks(path: Path, chunks: Iterable[bytes]) -> None:
    """Write `chunks` to `path` through a temporary file, with one open and no fsync.

    The per-file path of the slicer, which writes thousands of tiles: the rename keeps a
    crash from leaving a partial file under the final name, and a resumed run checks what
    it finds (a power loss may still leave a damaged tile, which the check catches).
    """
    with _replacing(path) as (fd, _):
        try:
            chunks = list(chunks)
            for i in range(0, len(chunks), IOV_BATCH):
                batch = chunks[i : i + IOV_BATCH]
                done = os.writev(fd, batch)
                if done < sum(len(c) for c in batch):  # a short write: the rest in one piece
                    rest = memoryview(b"".join(batch))[done:]
                    while rest:
                        rest = rest[os.write(fd, rest) :]
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
