"""A stage's account of what it did: counts per outcome, and the bad items by name."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sarkit import log


@dataclass
class Report:
    """Skips are by design (a nodata tile, a dropped record); errors are bad input.

    A stage with any error exits 1 after writing every good record, so a pipeline
    notices while nothing good is lost.
    """

    stage: str
    done: int = 0
    skipped: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    notes: dict[str, object] = field(default_factory=dict)

    def ok(self, n: int = 1) -> None:
        self.done += n

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def error(self, message: str) -> None:
        """Report a bad item at once, on one line, and count it."""
        self.errors.append(message)
        log.error(message)

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    def print_summary(self) -> None:
        if log.is_quiet():  # not shown: skip rich's import and the table
            return
        from rich.table import Table

        table = Table(title=f"sarkit {self.stage}", title_justify="left", show_header=True)
        table.add_column("outcome")
        table.add_column("count", justify="right")
        table.add_row("done", str(self.done))
        for reason, n in sorted(self.skipped.items()):
            table.add_row(f"skipped: {reason}", str(n))
        if self.errors:
            table.add_row("[red]errors (bad input)[/red]", str(len(self.errors)))
        for key, value in self.notes.items():
            table.add_row(key, str(value))
        log.console.print(table)
