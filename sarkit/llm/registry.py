"""Resolve `--llm NAME` to the backend that serves it (first claim wins)."""

from __future__ import annotations

from sarkit.errors import UsageError
from sarkit.llm.base import Backend, Model
from sarkit.plugins import get_manager


def backends() -> list[Backend]:
    """All registered backends, third-party first (pluggy calls later registrations first)."""
    found: list[Backend] = []
    for contribution in get_manager().hook.sarkit_llm_backends():
        found.extend(contribution or [])
    return found


def models() -> dict[str, tuple[Backend, Model]]:
    """Every model name, served by the first backend that claims it."""
    served: dict[str, tuple[Backend, Model]] = {}
    for backend in backends():
        for model in backend.models:
            served.setdefault(model.name, (backend, model))
    return served


def resolve(name: str) -> tuple[Backend, Model]:
    served = models()
    if name not in served:
        known = ", ".join(sorted(served)) or "none"
        raise UsageError(f"unknown --llm '{name}'; registered models: {known}")
    return served[name]
