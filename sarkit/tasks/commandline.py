"""Command lines of `finetune` and `eval`, built per head from its declared options.

`sarkit finetune TASK` and `sarkit eval TASK` are click groups whose subcommands are the
registered heads (looked up only when named, so other commands never load them): each
subcommand has the common options plus the head's own (``HeadOption``), whose values reach
the head in ``options.extra``. A common option left out takes the head's default
(``head.defaults``), else the global one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import click

from sarkit.hookspecs import HeadOption
from sarkit.model.visionargs import parse_vision_args
from sarkit.ranges import FRACTION, NON_NEGATIVE, POSITIVE, number_in

PRECISIONS = ("fp32", "bf16", "fp16")


class NamedParse(click.ParamType):
    """A parser function (``sarkit.ranges.number_in``) as a click type whose errors name
    the option: click's own wrapper of a plain function says only "Invalid value"."""

    def __init__(self, func: Any):
        self.func = func
        self.name = getattr(func, "__name__", "VALUE")

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        import typer  # its BadParameter is its own vendored click's, not this click's

        try:
            return self.func(value)
        except (click.BadParameter, typer.BadParameter) as exc:
            self.fail(exc.message, param, ctx)
        except (TypeError, ValueError) as exc:
            self.fail(str(exc), param, ctx)


def named(params: list[click.Parameter]) -> list[click.Parameter]:
    """The parameters with every plain parser function wrapped in `NamedParse`."""
    for p in params:
        if isinstance(p.type, click.types.FuncParamType):
            p.type = NamedParse(p.type.func)
    return params


def click_option(opt: HeadOption) -> click.Option:
    """A HeadOption as a click option (its value under ``opt.dest``)."""
    if opt.type is bool:
        return click.Option([opt.flag], is_flag=True, default=bool(opt.default), help=opt.help)
    kind: Any = click.Choice(opt.choices) if opt.choices else opt.type
    shown = opt.default is not None
    return click.Option(
        [opt.flag], type=kind, default=opt.default, show_default=shown, help=opt.help
    )


def head_options(options: Iterable[HeadOption], mode: str) -> list[click.Option]:
    return [click_option(o) for o in options if mode in o.modes]


def finetune_options(head: Any) -> list[click.Option]:
    """The common fine-tune options; defaults shown are the head's."""
    d = dict(getattr(head, "defaults", {}) or {})

    def opt(flags, help, **kw):
        default = d.get(kw.pop("dest"), kw.pop("fallback", None))
        return click.Option(
            flags, default=default, show_default=default is not None, help=help, **kw
        )

    return [
        click.Option(
            ["--data"], required=True, help="Training data (folders, CSV, records, COCO JSON ...)."
        ),
        click.Option(
            ["--val-data"], help="Held-out data (default: the data's own split, else a seeded 4:1)."
        ),
        click.Option(["-o", "--output"], required=True, type=click.Path(), help="Run folder."),
        click.Option(
            ["--init"],
            default="random",
            show_default=True,
            help="RUN folder (a sarkit pretrain/scio run), timm:NAME, random, or a weights FILE.",
        ),
        opt(
            ["--vision"],
            "timm ViT for random/FILE inits (tiny/small/base/large or a timm name).",
            dest="vision",
            fallback="vit_tiny_patch16_224",
        ),
        click.Option(
            ["--vision-args"],
            type=parse_vision_args,
            help="timm constructor keywords for random/timm/FILE inits, e.g. "
            "patch_size=2,depth=6 (a run init keeps its own).",
        ),
        opt(
            ["--image-size"],
            "Input side in pixels.",
            dest="image_size",
            type=click.IntRange(16),
            fallback=64,
        ),
        opt(["--epochs"], "Training epochs.", dest="epochs", type=click.IntRange(1), fallback=10),
        click.Option(
            ["--max-steps"], type=click.IntRange(1), help="Stop after this many optimiser steps."
        ),
        opt(
            ["--batch-size"],
            "Per process, per micro-batch.",
            dest="batch_size",
            type=click.IntRange(1),
            fallback=32,
        ),
        click.Option(
            ["--grad-accum"],
            type=click.IntRange(1),
            default=1,
            show_default=True,
            help="Micro-batches per optimiser step.",
        ),
        opt(["--lr"], "Peak learning rate (AdamW).", dest="lr", type=POSITIVE, fallback=1e-3),
        opt(
            ["--warmup-steps"],
            "Linear warm-up steps.",
            dest="warmup_steps",
            type=click.IntRange(0),
            fallback=100,
        ),
        opt(
            ["--weight-decay"],
            "AdamW weight decay.",
            dest="weight_decay",
            type=NON_NEGATIVE,
            fallback=0.05,
        ),
        opt(
            ["--drop-path"],
            "Stochastic depth rate of the ViT.",
            dest="drop_path",
            type=FRACTION,
            fallback=0.1,
        ),
        click.Option(
            ["--val-fraction"],
            type=number_in(0, 1, lo_open=True, hi_open=True),
            default=0.2,
            show_default=True,
            help="Held-out share of a seeded split (the data gives none).",
        ),
        click.Option(
            ["--ema"],
            type=number_in(0, 1, lo_open=True, hi_open=True),
            help="Measure and save (best, last) a moving average of the weights with this "
            "decay per optimiser step, e.g. 0.998 (default: the live weights).",
        ),
        click.Option(["--seed"], type=int, default=42, show_default=True),
        click.Option(
            ["--precision"], type=click.Choice(PRECISIONS), default="fp32", show_default=True
        ),
        click.Option(
            ["--deepspeed"],
            help="zero1, zero2, zero3, zero2-offload, zero3-offload or a JSON file.",
        ),
        click.Option(["--resume"], help="'latest' or a checkpoint folder."),
        click.Option(
            ["--workers"],
            type=click.IntRange(0),
            default=2,
            show_default=True,
            help="DataLoader worker processes.",
        ),
        click.Option(
            ["--save-every"],
            type=click.IntRange(1),
            default=1000,
            show_default=True,
            help="Checkpoint every N steps (and at the end).",
        ),
        click.Option(["--log-every"], type=click.IntRange(1), default=10, show_default=True),
    ]


def eval_options() -> list[click.Option]:
    return [
        click.Argument(["run"], type=click.Path(), required=False),
        click.Option(["--data"], help="Data to measure on (default: the run's held-out split)."),
        click.Option(
            ["--weights"],
            type=click.Choice(("last", "best")),
            default="last",
            show_default=True,
            help="Which of the run's weights (best: picked on its held-out split).",
        ),
        click.Option(["--batch-size"], type=click.IntRange(1), default=64, show_default=True),
        click.Option(["--workers"], type=click.IntRange(0), default=0, show_default=True),
        click.Option(
            ["--precision"], type=click.Choice(PRECISIONS), default="fp32", show_default=True
        ),
        click.Option(["--figures"], type=click.Path(), help="Figure folder (default: RUN/eval)."),
    ]


def split_extra(values: dict, head: Any, mode: str) -> tuple[dict, dict]:
    """(common values, the head's own values) of a parsed command line."""
    own = {o.dest for o in getattr(head, "options", ()) if mode in o.modes}
    return (
        {k: v for k, v in values.items() if k not in own},
        {k: v for k, v in values.items() if k in own},
    )
