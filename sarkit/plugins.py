"""The plugin manager: built-ins first, then third-party packages from the `sarkit` entry points.

Set ``SARKIT_DISABLE_PLUGINS=1`` (or ``all``) to load no third-party plugin at all, or a
comma-separated list of entry-point names to skip just those: the way out when an installed
plugin misbehaves.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from sarkit import __version__, hookspecs
from sarkit.errors import SarkitError, UsageError

hookimpl = pluggy.HookimplMarker("sarkit")

ENTRY_POINT_GROUP = "sarkit"
DISABLE_ENV = "SARKIT_DISABLE_PLUGINS"

#: Built-in plugins, registered in this order before any third-party plugin. Each module
#: must import cheaply (heavy libraries are imported inside the hook bodies).
BUILTINS = (
    "sarkit.sensors.builtin",
    "sarkit.raster.quantise",
    "sarkit.raster.plugin",
    "sarkit.train.plugin",
    "sarkit.quality.plugin",
    "sarkit.caption.plugin",
    "sarkit.scio.plugin",
    "sarkit.tasks.plugin",
    "sarkit.tasks.vl.plugin",
    "sarkit.search.plugin",
)


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str
    source: str
    hooks: tuple[str, ...]


def _disabled_names() -> set[str] | None:
    """None: all third-party plugins load; empty set never happens; {'*'}: none load."""
    value = os.environ.get(DISABLE_ENV, "").strip()
    if not value or value.lower() in ("0", "false", "no"):
        return None
    if value.lower() in ("1", "true", "yes", "all", "*"):
        return {"*"}
    return {part.strip() for part in value.split(",") if part.strip()}


def _new_manager() -> tuple[pluggy.PluginManager, dict[str, tuple[str, str]]]:
    pm = pluggy.PluginManager("sarkit")
    pm.add_hookspecs(hookspecs)
    origin: dict[str, tuple[str, str]] = {}
    for module_name in BUILTINS:
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        origin[module_name] = (__version__, "built-in")
    disabled = _disabled_names()
    if disabled == {"*"}:
        return pm, origin
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if disabled and ep.name in disabled:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the whole tool down silently
            raise SarkitError(
                f"plugin '{ep.name}' ({ep.value}) failed to load: {exc}; "
                f"set {DISABLE_ENV}={ep.name} to skip it"
            ) from exc
        dist = ep.dist
        origin[ep.name] = (
            dist.version if dist else "?",
            f"entry point {ep.value}" + (f" in {dist.metadata['Name']}" if dist else ""),
        )
    return pm, origin


@functools.lru_cache(maxsize=1)
def _cached() -> tuple[pluggy.PluginManager, dict[str, tuple[str, str]]]:
    return _new_manager()


def get_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (loaded once)."""
    return _cached()[0]


def reset() -> None:
    """Forget the loaded manager (tests change the environment and load again)."""
    _cached.cache_clear()


def describe() -> list[PluginInfo]:
    pm, origin = _cached()
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = tuple(sorted(c.name for c in pm.get_hookcallers(plugin) or []))
        version, source = origin.get(name, ("?", "registered at run time"))
        infos.append(PluginInfo(name, version, source, hooks))
    return infos


def collect(hook: str) -> dict[str, Any]:
    """Gather a registry hook's contributions by ``.name``; later registrations replace earlier.

    pluggy calls the last registered plugin first, so results are walked in reverse to let
    third-party plugins (registered after the built-ins) override a built-in name.
    """
    results = getattr(get_manager().hook, hook)()
    merged: dict[str, Any] = {}
    for contribution in reversed(results):
        for item in contribution or []:
            merged[item.name] = item
    return merged


def lookup(hook: str, name: str, what: str) -> Any:
    """One registry entry by name, or a usage error that lists the known names."""
    registry = collect(hook)
    if name not in registry:
        known = ", ".join(sorted(registry)) or "none"
        raise UsageError(f"unknown {what} '{name}'; known: {known}")
    return registry[name]
