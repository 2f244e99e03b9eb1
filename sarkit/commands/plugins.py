"""`sarkit plugins`: what is loaded, from where, and which hooks each implements."""

from __future__ import annotations

import json

import typer

from sarkit import plugins


def command(
    as_json: bool = typer.Option(False, "--json", help="One JSON object per plugin."),
) -> None:
    """List loaded plugins (built-in and third-party) and the hooks they implement."""
    infos = plugins.describe()
    if as_json:
        for info in infos:
            print(json.dumps(info.__dict__))
        return
    from rich.console import Console  # only here: every command would pay for its import
    from rich.table import Table

    table = Table(title="sarkit plugins", title_justify="left")
    for column in ("plugin", "version", "from", "hooks"):
        table.add_column(column, overflow="fold")
    for info in infos:
        table.add_row(info.name, info.version, info.source, ", ".join(info.hooks))
    Console(width=max(120, Console().width)).print(table)
