"""`sarkit eval TASK RUN`: measure a fine-tuned run; `sarkit eval --compare RUN...`."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click
import typer

from sarkit import log, plugins
from sarkit.commands.evaltext import text_command
from sarkit.commands.finetune import HeadGroup
from sarkit.errors import UsageError

NAME = "eval"


def _eval(head, values: dict) -> None:
    from sarkit.tasks.commandline import split_extra
    from sarkit.tasks.options import EvalOptions

    common, extra = split_extra(values, head, "eval")
    if not common.get("run") and not extra.get("llm"):  # only `eval vqa --llm` needs none
        raise UsageError(f"eval {head.name} needs a RUN folder")
    options = EvalOptions(
        run=Path(common["run"]) if common.get("run") else None,
        data=common.get("data"),
        weights=common["weights"],
        batch_size=common["batch_size"],
        workers=common["workers"],
        precision=common["precision"],
        figures=Path(common["figures"]) if common.get("figures") else None,
        extra=extra,
    )
    with contextlib.redirect_stdout(sys.stderr):
        record = plugins.get_manager().hook.sarkit_eval(task=head.name, options=options)
    if record is None:
        raise UsageError(f"no plugin evaluates '{head.name}'")
    rows = [(k, f"{v:.4f}") for k, v in record["metrics"].items()] + [
        (k, v) for k, v in record.get("table", [])
    ]
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        log.info(f"{key:<{width}}  {value}")
    print(json.dumps(record))


def _compare(runs, markdown, csv_path) -> None:
    from sarkit.atomic import write_text
    from sarkit.tasks import compare

    if not runs:
        raise UsageError("eval --compare needs at least one run folder")
    rows, columns, cells = compare.table([Path(r) for r in runs])
    md = compare.markdown(rows, columns, cells)
    if not log.is_quiet():
        sys.stderr.write(md)
    if markdown:
        write_text(markdown, md)
    if csv_path:
        write_text(csv_path, compare.csv_text(rows, columns, cells))
    print(compare.as_json(rows, columns, cells))


def compare_command() -> click.Command:
    return click.Command(
        "compare",
        params=[
            click.Argument(["runs"], nargs=-1, type=click.Path()),
            click.Option(["--markdown"], type=click.Path(), help="Write the table as Markdown."),
            click.Option(["--csv", "csv_path"], type=click.Path(), help="Write the table as CSV."),
        ],
        callback=_compare,
        help="Table 4 layout from run folders: rows = inits, columns = task metrics.",
    )


class EvalGroup(HeadGroup):
    """`eval --compare RUN...` is the `compare` subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] == "--compare":
            args = ["compare", *args[1:]]
        return super().parse_args(ctx, args)


group = EvalGroup(
    "eval",
    mode="eval",
    callback=_eval,
    extras={"compare": compare_command, "text": text_command},
    help="Measure a fine-tuned run (sarkit eval TASK RUN --data D; JSON on stdout, table on "
    "stderr), or compare runs (sarkit eval --compare RUN... [--markdown F] [--csv F]).",
    no_args_is_help=True,
)


#: the line after `eval` goes to the click group as it is (its --help too)
SETTINGS = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
    "add_help_option": False,
}


def command(ctx: typer.Context) -> None:
    """Measure a fine-tuned run on a task; eval --compare RUN... tabulates runs."""
    group.main(args=list(ctx.args), prog_name="sarkit eval", standalone_mode=True)
