"""Everything a human reads goes to stderr; stdout carries records only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

T = TypeVar("T")

console = Console(stderr=True, highlight=False)
_state = {"quiet": False, "debug": False}


def configure(quiet: bool = False, debug: bool = False) -> None:
    _state["quiet"] = quiet
    _state["debug"] = debug
    console.quiet = quiet


def is_debug() -> bool:
    return _state["debug"]


def info(message: str) -> None:
    console.print(message, markup=False)


def debug(message: str) -> None:
    if _state["debug"]:
        console.print(f"[dim]{message}[/dim]")


def error(message: str) -> None:
    """Errors are printed even under --quiet: a user must learn what was skipped."""
    Console(stderr=True, highlight=False).print(f"[red]error:[/red] {message}", soft_wrap=True)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)


@contextlib.contextmanager
def progress(description: str, total: int | None = None) -> Iterator[callable]:
    """A progress bar on stderr; yields `advance(n=1)`. Silent under --quiet."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=True,
        disable=_state["quiet"],
    )
    with bar:
        task = bar.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            if status is not None:
                bar.update(task, advance=n, status=status)
            else:
                bar.advance(task, n)

        yield advance


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    with progress(description, total) as advance:
        for item in items:
            yield item
            advance()
