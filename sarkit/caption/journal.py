"""The caption journal: append-only JSON Lines, fsync per entry, keyed by what makes a caption.

A key is (tile id, backend, model, prompt sha256): an edited prompt or another model is new
work, the same one is done. Killed at any moment (kill -9), the journal holds every finished
entry whole and at most one torn last line, which reading ignores; the next append starts on a
fresh line. One run at a time holds the journal (an exclusive lock), so two runs never
caption the same tile twice into it.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any

from sarkit.errors import OutputError, SarkitError


def entry_key(tile_id: str, backend: str, model: str, prompt_sha256: str) -> str:
    return "\t".join((tile_id, backend, model, prompt_sha256))


class Journal:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.done: dict[str, dict[str, Any]] = {}
        self.torn = 0
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a+b")  # noqa: SIM115 - held for the run
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            message = f"{self.path} (--journal): cannot open ({reason})"
            raise OutputError(exc.errno or 0, message) from None
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise SarkitError(
                f"{self.path}: journal is in use by another sarkit caption run"
            ) from None
        self._load()

    def _load(self) -> None:
        self._fh.seek(0)
        data = self._fh.read()
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = entry["key"]
            except (ValueError, KeyError, TypeError):
                self.torn += 1  # a line cut by a kill: that tile is simply not done
                continue
            if entry.get("status") == "done":
                self.done[key] = entry
        if data and not data.endswith(b"\n"):
            self._fh.write(b"\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def get(self, key: str) -> dict[str, Any] | None:
        return self.done.get(key)

    def append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fh.closed:  # a worker finishing after an interrupted run closed it
                return
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            if entry.get("status") == "done":
                self.done[entry["key"]] = entry

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
                self._fh.close()
