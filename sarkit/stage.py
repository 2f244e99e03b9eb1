"""The loop every record stage shares: read records, transform, write, summarise, exit code."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from sarkit.records import Located, Record, RecordWriter, read_records
from sarkit.report import Report

Transform = Callable[[Iterator[Located], Report], Iterable[Record]]


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
