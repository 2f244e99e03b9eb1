"""Built-in task heads and dataset builders, registered like any third-party plugin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sarkit.plugins import hookimpl


@hookimpl
def sarkit_task_heads() -> list[Any]:
    from sarkit.tasks.classify import ClassifyHead
    from sarkit.tasks.detect import DetectHead
    from sarkit.tasks.segment import SegmentHead

    return [ClassifyHead(), DetectHead(), SegmentHead()]


@hookimpl
def sarkit_data_builders() -> list[Any]:
    from sarkit.tasks.boxes import BoxesFromMasks

    return [BoxesFromMasks()]


@hookimpl(trylast=True)
def sarkit_finetune(task: str, options: Any) -> Path | None:
    from sarkit.tasks import finetune, registry

    return finetune.run(registry.head(task), options)


@hookimpl(trylast=True)
def sarkit_eval(task: str, options: Any) -> dict | None:
    from sarkit.tasks import finetune, registry

    return finetune.evaluate(registry.head(task), options)
