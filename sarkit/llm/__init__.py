"""LLM backends for `sarkit caption`: the shared types, the registry and the built-ins.

A backend (like a simonw/llm model plugin) declares the model names it serves; `--llm NAME`
picks the first backend that claims NAME. The built-ins are `openai` (any OpenAI-compatible
Chat Completions endpoint) and `offline` (no network: grounded in the tile's pixels).
"""
