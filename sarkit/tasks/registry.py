"""The head and builder registries, collected from the plugin manager (same name replaces)."""

from __future__ import annotations

from typing import Any

from sarkit import plugins


def heads() -> dict[str, Any]:
    """Every task head by name (built-ins first, third-party plugins replace them)."""
    return plugins.collect("sarkit_task_heads")


def head(name: str) -> Any:
    """One head, or a usage error listing the known tasks."""
    return plugins.lookup("sarkit_task_heads", name, "task")


def builders() -> dict[str, Any]:
    """Every `finetune build` data builder by name."""
    return plugins.collect("sarkit_data_builders")
