"""Built-in `sarkit embed` / `sarkit search` stages and the exact and two FAISS index backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sarkit.plugins import hookimpl


@hookimpl
def sarkit_index_backends() -> list[Any]:
    from sarkit.search.backends import ExactBackend, IVFBackend, IVFPQBackend

    return [ExactBackend(), IVFBackend(), IVFPQBackend()]


@hookimpl(trylast=True)
def sarkit_embed(options: Any, report: Any) -> Path | None:
    from sarkit.search.embed import embed

    return embed(options, report)


@hookimpl(trylast=True)
def sarkit_search(options: Any, report: Any) -> tuple[list[dict], Any] | None:
    from sarkit.search.query import search

    return search(options, report)
