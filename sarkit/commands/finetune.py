"""`sarkit finetune TASK`: fine-tune a backbone on a downstream task; `finetune build`.

The subcommands are the registered task heads (``sarkit_task_heads``) and ``build``, whose
options come from the registered data builders (``sarkit_data_builders``).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click
import typer

from sarkit import log, plugins
from sarkit.errors import UsageError


def _finetune(head, values: dict) -> None:
    from sarkit.commands.pretrain import check_deepspeed, check_output_folder
    from sarkit.outputs import check_new_run
    from sarkit.tasks.commandline import split_extra
    from sarkit.tasks.options import FinetuneOptions

    common, extra = split_extra(values, head, "finetune")
    output = Path(common.pop("output"))
    check_output_folder(output)
    check_new_run(output, common.get("resume"))
    check_deepspeed(common.get("deepspeed"))
    options = FinetuneOptions.for_head(head, output=output, extra=extra, **common)
    with contextlib.redirect_stdout(sys.stderr):
        run = plugins.get_manager().hook.sarkit_finetune(task=head.name, options=options)
    if run is None:
        raise UsageError(f"no plugin fine-tunes '{head.name}'")
    log.info(f"fine-tuned {head.name} -> {run}")


def _build(values: dict) -> None:
    from sarkit.outputs import check_file
    from sarkit.tasks.registry import builders

    output = values.pop("output")
    chosen = [b for b in builders().values() if values.get(b.trigger.lstrip("-").replace("-", "_"))]
    if len(chosen) != 1:
        triggers = ", ".join(sorted(b.trigger for b in builders().values()))
        why = "several of" if chosen else "one of"
        raise UsageError(f"finetune build needs {why} {triggers}")
    if getattr(chosen[0], "output_is_folder", False):  # e.g. --from: several files into -o
        if Path(output).exists() and not Path(output).is_dir():
            raise UsageError(f"{output} (--output): exists and is not a folder")
    else:
        check_file(output, "--output")
    log.info(chosen[0].build(values, Path(output)))


def build_command() -> click.Command:
    from sarkit.tasks.commandline import head_options, named
    from sarkit.tasks.registry import builders

    params: list[click.Parameter] = [
        click.Option(["-o", "--output"], required=True, help="The dataset file to write.")
    ]
    seen = {"--output"}
    for builder in builders().values():
        for opt in head_options(builder.options, "build"):
            if opt.opts[0] not in seen:
                seen.add(opt.opts[0])
                params.append(opt)
    return click.Command(
        "build",
        params=named(params),
        callback=lambda **values: _build(values),
        help="Make a fine-tuning dataset file (COCO boxes from masks; plugins add builders).",
    )


def head_command(head, mode: str, callback) -> click.Command:
    from sarkit.tasks.commandline import eval_options, finetune_options, head_options, named

    common = finetune_options(head) if mode == "finetune" else eval_options()
    return click.Command(
        head.name,
        params=named([*common, *head_options(head.options, mode)]),
        callback=lambda **values: callback(head, values),
        help=head.summary,
    )


class HeadGroup(click.Group):
    """Subcommands = registered heads (+ fixed extras), looked up when named."""

    def __init__(self, *args, mode: str, callback, extras: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.mode, self.head_callback, self.extras = mode, callback, extras

    def list_commands(self, ctx: click.Context) -> list[str]:
        from sarkit.tasks.registry import heads

        return sorted(heads()) + list(self.extras)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.extras:
            return self.extras[name]()
        from sarkit.tasks.registry import heads

        head = heads().get(name)
        return head_command(head, self.mode, self.head_callback) if head else None


group = HeadGroup(
    "finetune",
    mode="finetune",
    callback=_finetune,
    extras={"build": build_command},
    help="Fine-tune a backbone (--init RUN|timm:NAME|random|FILE) on a task: "
    "sarkit finetune TASK --data D -o RUN; `finetune build` makes datasets.",
    no_args_is_help=True,
)


#: the line after `finetune` goes to the click group as it is (its --help too)
SETTINGS = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
    "add_help_option": False,
}


def command(ctx: typer.Context) -> None:
    """Fine-tune a backbone on a task (classify, detect, segment ...); finetune build."""
    group.main(args=list(ctx.args), prog_name="sarkit finetune", standalone_mode=True)
