"""`sarkit embed`: tile records -> an index folder of the run's ITC vectors (resumable)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer

from sarkit import plugins
from sarkit.errors import SarkitError
from sarkit.outputs import check_folder
from sarkit.report import Report


def command(
    inputs: list[str] = typer.Argument(
        None, help="Tile record files (JSON Lines with 'id', 'path'; 'geo' for maps); - : stdin."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="The index folder (made or resumed)."),
    run: Path = typer.Option(
        ..., "--run", help="The model: a pretrain / SCIO run or a fine-tuned retrieval run."
    ),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Tiles per forward."),
    workers: int = typer.Option(
        2, "--jobs", "-j", min=0, help="Threads reading tiles (0: in the main thread)."
    ),
    chunk: int = typer.Option(
        1024, "--chunk", min=1, help="Tiles per stored chunk (also flushed every 30 s)."
    ),
    backend: str = typer.Option(
        "auto",
        "--backend",
        help="Index structure: exact, faiss-ivf, faiss-ivfpq, a plugin's, or auto (faiss-ivfpq "
        "from 20,000 tiles).",
    ),
) -> None:
    """Embed tiles with a run's vision tower into a search index (rerun resumes)."""
    from sarkit.search.embed import EmbedOptions

    check_folder(output, "--output")
    if backend != "auto":
        plugins.lookup("sarkit_index_backends", backend, "index backend")
    options = EmbedOptions(
        inputs=list(inputs or ["-"]),
        output=output,
        run=run,
        batch_size=batch_size,
        workers=workers,
        chunk=chunk,
        backend=backend,
    )
    report = Report("embed")
    with contextlib.redirect_stdout(sys.stderr):
        folder = plugins.get_manager().hook.sarkit_embed(options=options, report=report)
    if folder is None:
        raise SarkitError("no embed plugin took the records")
    report.print_summary()
    raise typer.Exit(1 if report.failed else 0)
