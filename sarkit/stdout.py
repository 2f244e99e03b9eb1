"""stdout carries records only: while a stage writes records there, anything else a library
prints (Python's print or a C library's write to file descriptor 1) goes to stderr.

One stray line in the record stream breaks every stage after it in a pipeline
(`sarkit slice ... | sarkit georef`), and the stage that printed it cannot tell.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import IO


def _stdout_fd() -> int | None:
    """1 when sys.stdout is the process's own standard output, else None (a test's
    StringIO, or a stream that has no descriptor)."""
    try:
        return 1 if sys.stdout.fileno() == 1 else None
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


@contextlib.contextmanager
def records_only() -> Iterator[IO[str]]:
    """Yield the stream for records; meanwhile sys.stdout, and descriptor 1 where it is the
    real standard output, point at stderr. Both are restored on the way out."""
    original = sys.stdout
    fd = _stdout_fd()
    if fd is None:  # no descriptor to move: guard Python-level prints only
        sys.stdout = sys.stderr
        try:
            yield original
        finally:
            sys.stdout = original
        return
    original.flush()
    saved = os.dup(fd)
    records = os.fdopen(os.dup(saved), "w", encoding="utf-8", newline="\n")
    os.dup2(sys.stderr.fileno(), fd)
    sys.stdout = sys.stderr
    try:
        yield records
    finally:
        sys.stdout = original
        with contextlib.suppress(OSError):  # a reader gone away (BrokenPipe): nothing to do
            records.flush()
        with contextlib.suppress(OSError):
            records.close()
        os.dup2(saved, fd)
        os.close(saved)
