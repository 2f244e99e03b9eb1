"""`sarkit caption`: HCoT captions for tile records through swappable LLM backends."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class CaptionOptions:
    """What a caption run needs; a plugin reads the fields it knows and ignores the rest."""

    llm: str = "offline"
    task: str = "auto"  #: terrain, marine, ground, or auto (chosen per tile)
    prompts: str | None = None
    base_url: str | None = None
    model_id: str | None = None
    keys_file: str | None = None
    concurrency: int = 8
    journal: str | None = None
    max_cost: float | None = None
    dry_run: bool = False
    limit: int | None = None
    timeout: float = 120.0
    retries: int = 6
    max_tokens: int = 1200
    temperature: float = 0.2
    image_size: int = 1024
    record_dirs: list[str] = field(default_factory=list)  #: where relative tile paths may be
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
