"""Errors a user can act on: the CLI prints them as one line and exits 1, no traceback."""

from __future__ import annotations


class SarkitError(Exception):
    """Bad input or a bad request. The message names the file or record and what is wrong."""

    exit_code = 1


class UsageError(SarkitError):
    """The command line itself is wrong (unknown name, conflicting options)."""

    exit_code = 2


class RecordError(SarkitError):
    """A record in a JSON Lines stream is malformed or misses a key it needs."""

    def __init__(self, source: str, line: int, message: str, record_id: str | None = None):
        self.source = source
        self.line = line
        self.record_id = record_id
        where = f"{source}:{line}"
        if record_id:
            where += f" ({record_id})"
        super().__init__(f"{where}: {message}")


class OutputError(SarkitError, OSError):
    """An output cannot be written (read-only, under a regular file, no space): named by the
    path the user gave, not by a temporary file. Still an OSError for code that catches one.

    Made as ``OutputError(errno, message)``, like OSError (so it pickles from a worker)."""

    def __str__(self) -> str:
        return str(self.strerror)
