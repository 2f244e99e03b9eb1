"""`sarkit shard`: records and their tiles -> tar shards for `sarkit pretrain shards/*.tar`."""

from __future__ import annotations

from pathlib import Path

import typer

from sarkit import log


def command(
    records: Path = typer.Argument(..., help="Records (JSON Lines with 'path')."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the .tar shards."),
    per_shard: int = typer.Option(
        2000, "--per-shard", min=1, help="Samples per shard (256 px tiles: ~130 MB each)."
    ),
) -> None:
    """Pack records and their tiles into WebDataset-layout tar shards (few large files for
    cluster file systems); `sarkit pretrain shards/*.tar` then trains on exactly the same
    samples as on the records file."""
    from sarkit.errors import SarkitError
    from sarkit.train.shards import write_shards

    if not records.is_file():
        raise SarkitError(f"{records}: no such file")
    written, shards, skipped = write_shards(records, output, per_shard)
    extra = f", {skipped} skipped (tile unreadable)" if skipped else ""
    log.info(f"{written} records -> {shards} shard(s) in {output}{extra}")
