"""The built-in filter stage and quality filters, registered as a plugin (last in line)."""

from __future__ import annotations

from sarkit.plugins import hookimpl


@hookimpl
def sarkit_quality_filters() -> list:
    from sarkit.quality.rules import BUILTIN_FILTERS

    return list(BUILTIN_FILTERS)


@hookimpl(trylast=True)
def sarkit_filter(records, options, report):
    from sarkit.quality.screen import run

    return run(records, options, report)
