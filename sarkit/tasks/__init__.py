"""Downstream tasks: fine-tuning heads, their data, metrics and figures.

How a head plugs in (the built-in ones do exactly this, see ``sarkit.tasks.plugin``):

1. Write an object with the attributes of ``sarkit.hookspecs.TaskHead``: ``name`` (the
   word after ``sarkit finetune`` / ``sarkit eval``), ``summary``, ``primary`` (the metric
   that picks the best epoch), ``defaults`` (its settings of the common options), ``options``
   (``HeadOption`` list: its own flags, values in ``options.extra``), and the methods
   ``prepare(FinetuneOptions) -> Prepared``, ``evaluate(run, EvalOptions) -> EvalResult`` and
   ``figures(result, folder)``.
2. ``prepare`` returns the loop's task (a ``sarkit.train.task.ModuleTask``: the model's
   ``forward(**batch)`` returns ``{"loss": ...}``), the training dataset and collate, the
   split (``Split``) and the head's config; ``sarkit.tasks.finetune.run`` trains it through
   the shared loop (``sarkit.train.loop.Loop``: DeepSpeed, precision, accumulation,
   ``--resume latest`` come with it) and writes the run folder (``sarkit.tasks.runfolder``).
   ``sarkit.tasks.backbone.load_backbone`` gives the ViT that ``--init`` names.
3. Return it from a ``sarkit_task_heads`` hook implementation in a module registered as a
   plugin (entry point group ``sarkit``); the same name replaces a built-in head.

Dataset builders for ``sarkit finetune build`` (``sarkit.hookspecs.DataBuilder``) come from
``sarkit_data_builders`` in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Split:
    """Which items train and which are held out, and how that was decided (split.json)."""

    train: list[str]
    val: list[str]
    how: str  # "given" (folders, ImageSets, files) or "seeded 4:1"
    seed: int | None = None


@dataclass
class Prepared:
    """What a head's ``prepare`` hands the generic fine-tuning run."""

    task: Any  # the loop's task (ModuleTask); its evaluate() measures the held-out split
    dataset: Any
    collate: Any
    split: Split
    config: dict = field(default_factory=dict)  # the head's part of config.json (classes ...)


@dataclass
class EvalResult:
    """A measured run: flat ``metrics`` (name -> number) and ``details`` for figures."""

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    table: list[tuple[str, str]] = field(default_factory=list)  # extra rows for stderr
