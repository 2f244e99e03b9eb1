"""The built-in vision-language heads and the `finetune build --from` builder, as a plugin."""

from __future__ import annotations

from typing import Any

from sarkit.plugins import hookimpl


@hookimpl
def sarkit_task_heads() -> list[Any]:
    from sarkit.tasks.vl.heads import heads

    return heads()


@hookimpl
def sarkit_data_builders() -> list[Any]:
    from sarkit.tasks.vl.build import FromAnnotations

    return [FromAnnotations()]


@hookimpl
def sarkit_eval(task: str, options: Any) -> dict | None:
    """`eval vqa --llm NAME`: an LLM answers instead of a run (else the generic eval)."""
    if task != "vqa" or not options.extra.get("llm"):
        return None
    from sarkit.tasks.vl.llmvqa import evaluate_llm

    return evaluate_llm(options)
