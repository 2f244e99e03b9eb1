"""`sarkit eval text RECORDS [--against OTHER] [--plot PNG --run RUN]`: caption statistics.

A subcommand of `sarkit eval` (sarkit.commands.eval lists it beside `compare`): tokens per
text, MTLD, distinct n-grams and the duplicate rate per field (sarkit.tasks.vl.textstats);
JSON on stdout, a table on stderr; ``--plot`` draws a t-SNE of a run's image and text
features of the records.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

from sarkit import log
from sarkit.errors import UsageError


def _run(records: str, against: str | None, plot: str | None, run: str | None, limit: int) -> None:
    from sarkit.tasks.vl import textstats

    if plot and not run:
        raise UsageError("--plot needs --run RUN (the model whose features are drawn)")
    if run and not plot:
        raise UsageError("--run is for --plot PNG")
    results = {}
    for path in [records] + ([against] if against else []):
        name = Path(path).name
        if name in results:
            name = str(path)
        results[name] = textstats.analyse(Path(path))
    if not log.is_quiet():
        sys.stderr.write(textstats.table(results) + "\n")
    if plot:
        n = textstats.tsne_plot(Path(records), Path(run), Path(plot), limit)
        log.info(f"t-SNE of {n} features -> {plot}")

    def clean(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    print(
        json.dumps(
            {
                k: {f: {m: clean(x) for m, x in s.items()} for f, s in v.items()}
                for k, v in results.items()
            }
        )
    )


def text_command() -> click.Command:
    return click.Command(
        "text",
        params=[
            click.Argument(["records"], type=click.Path()),
            click.Option(["--against"], type=click.Path(), help="A second dataset, side by side."),
            click.Option(
                ["--plot"], type=click.Path(), help="Draw a t-SNE of image and text features (PNG)."
            ),
            click.Option(["--run"], type=click.Path(), help="The run whose features --plot draws."),
            click.Option(
                ["--limit"],
                type=click.IntRange(3),
                default=500,
                show_default=True,
                help="Records drawn by --plot.",
            ),
        ],
        callback=_run,
        help="Text statistics per field (tokens, MTLD, distinct n-grams, duplicates) of "
        "captioned records, the builder's files or a JSON list of caption dicts.",
    )
