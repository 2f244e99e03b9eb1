"""What every LLM backend speaks: models, requests, answers and errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Model:
    """A model name a backend serves, and what the run needs to know about it."""

    name: str  #: what `--llm` takes
    backend: str  #: the backend's name
    model_id: str = ""  #: what is sent to the server (defaults to `name`)
    price_in: float = 0.0  #: USD per million input tokens
    price_out: float = 0.0  #: USD per million output tokens
    json_schema: bool = False  #: the server honours response_format json_schema
    vision: bool = True
    needs_key: bool = False  #: a key is required (a public API); local servers need none
    base_url: str = ""  #: default endpoint for this model (--base-url replaces it)
    description: str = ""

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.price_in + tokens_out * self.price_out) / 1e6

    @property
    def sent_id(self) -> str:
        return self.model_id or self.name


@dataclass
class Request:
    """One tile to caption: the filled prompt, the tile and what the offline backend reads."""

    record: dict
    task: Any  #: sarkit.caption.templates.TaskSpec
    system: str
    user: str
    image_path: str
    image_size: int = 1024
    parent: dict | None = None  #: the parent's record with its texts, when there is one
    scale_stage: str = "L"


@dataclass
class Answer:
    """A backend's answer: raw text, or fields already structured, and what it cost."""

    text: str = ""
    fields: dict[str, str] | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    attempts: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class BackendError(Exception):
    """The tile could not be captioned (retries exhausted, a bad answer): the tile fails."""


class BackendFatal(Exception):
    """The run cannot go on (the key was refused, the model does not exist): stop everything."""


class Client(Protocol):
    def complete(self, request: Request, repair: tuple[str, str] | None = None) -> Answer:
        """Caption one tile; `repair` = (previous answer, repair prompt) asks once more."""

    def estimate(self, request: Request) -> tuple[int, int]:
        """(input tokens, most output tokens) for --dry-run and --max-cost; optional."""

    def close(self) -> None: ...


class Backend(Protocol):
    name: str
    models: list[Model]

    def connect(self, model: Model, options: Any) -> Client:
        """Open a client for one run (thread-safe: called concurrently from worker threads)."""
