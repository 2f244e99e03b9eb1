"""The loop every record stage shares: read records, transform, write, summarise, exit code."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from sarkit.records import Located, Record, RecordWriter, read_records, tile_path_problem
from sarkit.report import Report

Transform = Callable[[Iterator[Located], Report], Iterable[Record]]


def with_tile_paths(items: Iterable[Located], report: Report) -> Iterator[Located]:
    """The records whose 'path' is a non-empty string; the others are reported by line."""
    for item in items:
        problem = tile_path_problem(item.record)
        if problem is not None:
            report.error(str(item.error(f"{problem}; skipped")))
            continue
        yield item


def unique_ids(items: Iterable[Located], report: Report) -> Iterator[Located]:
    """The records whose id was not seen before; a repeat is reported where it is met
    (naming where the id first came) and skipped, so ids stay keys downstream."""
    first: dict[str, tuple[str, int]] = {}
    for item in items:
        rid = item.id
        if rid is not None and rid in first:
            source, line = first[rid]
            report.error(str(item.error(f"duplicate id (first at {source}:{line}); skipped")))
            continue
        if rid is not None:
            first[rid] = (item.source, item.line)
        yield item


def run_record_stage(
    report: Report,
    inputs: Sequence[str] | None,
    output: str | None,
    transform: Transform,
    required: Sequence[str] = ("id",),
) -> int:
    """Stream `inputs` through `transform` into `output` (stdout when None or "-").

    Bad input lines are reported and skipped by the reader; `transform` reports bad items
    the same way. The exit code is 1 when anything was bad input, after every good record
    was written; the summary goes to stderr.
    """
    records = read_records(inputs, report, required)
    with RecordWriter(output) as writer:
        for record in transform(records, report):
            writer.write(record)
    report.print_summary()
    return 1 if report.failed else 0
