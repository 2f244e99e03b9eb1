"""Everything a human reads goes to stderr; stdout carries records only.

Under torchrun only rank 0 prints status lines and progress bars (every rank would print the
same ones); warnings and errors come from every rank, marked with it, since a rank's share of
the data can hold a bad item the others never see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from sarkit.launch import launch_rank as _rank  # read at each call: RANK may come late

if TYPE_CHECKING:
    from rich.console import Console

T = TypeVar("T")

_state: dict[str, Any] = {"quiet": False, "debug": False, "console": None}


def __getattr__(name: str) -> Any:
    # `log.console` is made on first use: rich takes 25 ms to import, and a --quiet run
    # (a pipeline's middle stage, say) never prints through it
    if name == "console":
        return _console()
    raise AttributeError(name)


def _console() -> Console:
    if _state["console"] is None:
        from rich.console import Console

        _state["console"] = Console(stderr=True, highlight=False, quiet=_state["quiet"])
    return _state["console"]


def is_quiet() -> bool:
    return _state["quiet"]


def configure(quiet: bool = False, debug: bool = False) -> None:
    _state["quiet"] = quiet
    _state["debug"] = debug
    if _state["console"] is not None:
        _state["console"].quiet = quiet


def is_debug() -> bool:
    return _state["debug"]


def _mark(message: str) -> str:
    rank = _rank()
    return f"(rank {rank}) {message}" if rank else message


def info(message: str) -> None:
    if _rank() and not _state["debug"]:
        return
    _console().print(message, markup=False, soft_wrap=True)  # a path is never cut


def debug(message: str) -> None:
    if _state["debug"]:
        _console().print(f"[dim]{message}[/dim]")


def error(message: str) -> None:
    """Errors are printed even under --quiet: a user must learn what was skipped."""
    from rich.console import Console

    Console(stderr=True, highlight=False).print(
        f"[red]error:[/red] {_mark(message)}", soft_wrap=True
    )


def warn(message: str) -> None:
    _console().print(f"[yellow]warning:[/yellow] {_mark(message)}", soft_wrap=True)


@contextlib.contextmanager
def progress(description: str, total: int | None = None) -> Iterator[callable]:
    """A progress bar on stderr; yields `advance(n=1)`. Silent under --quiet."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = _console()
    # Off a terminal nothing is drawn until the end, so no refresh thread need wake up during
    # training; on one, twice a second is enough for a bar whose steps take seconds.
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        auto_refresh=console.is_terminal,
        refresh_per_second=2,
        transient=True,
        disable=_state["quiet"] or bool(_rank()),
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
