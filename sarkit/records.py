"""Tile records as JSON Lines: read from files or stdin, write to stdout or a file atomically.

One record per tile. Each stage adds its own keys and passes the rest through untouched,
so a later stage never needs to know an earlier one's internals. Reading streams line by
line (constant memory); a malformed line or a record missing a key a stage needs is reported
with its source and line number and skipped, so the good records still flow.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sarkit.atomic import atomic_open
from sarkit.errors import RecordError, SarkitError
from sarkit.report import Report

#: Keys every tile record carries once `slice` has made it.
TILE_KEYS = (
    "id",
    "path",
    "scene",
    "scale",
    "parent",
    "window",
    "pixel_m",
    "ground_m",
    "crs",
    "transform",
    "sensor",
    "band",
    "polarization",
    "nodata_frac",
)

Record = dict[str, Any]


@dataclass(frozen=True)
class Located:
    """A record with where it came from, so errors can name the line."""

    source: str
    line: int
    record: Record

    @property
    def id(self) -> str | None:
        rid = self.record.get("id")
        return rid if isinstance(rid, str) else None

    def error(self, message: str) -> RecordError:
        return RecordError(self.source, self.line, message, self.id)


def _open_source(source: str) -> tuple[str, IO[bytes]]:
    """The source's name for messages and its bytes: lines are decoded one by one, so one
    damaged byte costs its own line, not the file."""
    if source == "-":
        return "<stdin>", getattr(sys.stdin, "buffer", None) or _Encoded(sys.stdin)
    path = Path(source)
    if not path.exists():
        raise SarkitError(f"{source}: no such file")
    if path.is_dir():
        raise SarkitError(f"{source}: is a folder, expected a JSON Lines file")
    try:
        return source, open(path, "rb")  # noqa: SIM115 - closed by read_records
    except OSError as exc:
        raise SarkitError(f"{source}: cannot read ({exc.strerror})") from None


class _Encoded:
    """Bytes lines from a text stream without a buffer (a test's StringIO)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def __iter__(self) -> Iterator[bytes]:
        return (line.encode("utf-8", "surrogateescape") for line in self.stream)


def decode_line(source: str, line_no: int, raw: bytes) -> str:
    """A line as text; a UTF-8 byte-order mark on the first line is dropped."""
    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
        raise RecordError(source, line_no, message) from None


def parse_line(source: str, line_no: int, text: str) -> Record:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        message = f"not valid JSON ({exc.msg} at column {exc.colno})"
        raise RecordError(source, line_no, message) from None
    if not isinstance(value, dict):
        raise RecordError(source, line_no, f"expected a JSON object, got {type(value).__name__}")
    return value


def require(item: Located, keys: Sequence[str]) -> None:
    """Raise a RecordError naming the first key in `keys` the record lacks."""
    for key in keys:
        if key not in item.record:
            raise item.error(f"record is missing key '{key}'")


def read_records(
    sources: Sequence[str] | None,
    report: Report | None = None,
    required: Sequence[str] = ("id",),
) -> Iterator[Located]:
    """Stream records from `sources` (paths, or "-" for stdin; none means stdin).

    Bad lines, and sources that cannot be read, are reported through `report` and
    skipped (the other sources go on); without a report they raise. Blank lines are ignored.
    """
    for source in sources or ["-"]:
        try:
            name, fh = _open_source(source)
        except SarkitError as exc:
            if report is None:
                raise
            report.error(str(exc))
            continue
        try:
            for line_no, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    text = decode_line(name, line_no, raw)
                    item = Located(name, line_no, parse_line(name, line_no, text))
                    require(item, required)
                except RecordError as exc:
                    if report is None:
                        raise
                    report.error(str(exc))
                    continue
                yield item
        finally:
            if fh is not getattr(sys.stdin, "buffer", None) and not isinstance(fh, _Encoded):
                fh.close()


def tile_path_problem(record: Record) -> str | None:
    """What is wrong with a record's tile 'path' as a value (None: a usable string)."""
    path = record.get("path")
    if not isinstance(path, str):
        return f"'path' must be a file path (a string), not {type(path).__name__}"
    if not path.strip():
        return "'path' is empty"
    return None


def dumps(record: Record) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class RecordWriter:
    """Write records to stdout (streamed, flushed per record) or to a file (atomic).

    For a file the records go to a temporary name that replaces the target only when the
    writer closes without an exception: an interrupted stage leaves no half-written file.
    """

    def __init__(self, output: str | os.PathLike | None = None):
        self.output = None if output in (None, "-") else Path(output)
        self.count = 0
        self._stack = contextlib.ExitStack()
        self._fh: IO[str] | None = None

    def __enter__(self) -> RecordWriter:
        if self.output is None:  # library prints go to stderr meanwhile (see sarkit.stdout)
            from sarkit.stdout import records_only

            self._fh = self._stack.enter_context(records_only())
        else:
            self._fh = self._stack.enter_context(atomic_open(self.output, "w", encoding="utf-8"))
        return self

    def write(self, record: Record) -> None:
        assert self._fh is not None, "RecordWriter used outside a with block"
        self._fh.write(dumps(record) + "\n")
        if self.output is None:
            self._fh.flush()
        self.count += 1

    def write_all(self, records: Iterable[Record]) -> int:
        for record in records:
            self.write(record)
        return self.count

    def __exit__(self, exc_type, exc, tb) -> bool:
        return bool(self._stack.__exit__(exc_type, exc, tb))


def load_all(path: str | os.PathLike, required: Sequence[str] = ("id",)) -> list[Record]:
    """Read a whole (small) record file; any bad line is an error. For datasets a model reads."""
    return [item.record for item in read_records([str(path)], None, required)]
