"""The built-in caption stage and LLM backends, registered as a plugin (last in line)."""

from __future__ import annotations

from sarkit.plugins import hookimpl


@hookimpl
def sarkit_llm_backends():
    from sarkit.llm.offline import OfflineBackend
    from sarkit.llm.openai import OpenAIBackend

    return [OpenAIBackend(), OfflineBackend()]


@hookimpl(trylast=True)
def sarkit_caption(records, options, report):
    from sarkit.caption.chain import caption_records

    return caption_records(records, options, report)
