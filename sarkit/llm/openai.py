"""The `openai` backend: any OpenAI-compatible Chat Completions endpoint, over httpx.

OpenAI itself (gpt-4.1), Azure, vLLM, Ollama, LM Studio. The tile goes as a PNG data URL.
Structured output with a JSON schema where the model supports it (a server that rejects
`response_format` is asked again without it, once per run); otherwise the 8 fields are read
from labelled lines. Transient failures (429, 5xx, timeouts, dropped connections, a garbled
body) are retried with exponential backoff and jitter, honouring Retry-After, a bounded
number of times. The key is read from the environment or a keys file and never written
anywhere: every message that could carry it is scrubbed.
"""

from __future__ import annotations

import email.utils
import json
import os
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sarkit import log
from sarkit.errors import SarkitError, UsageError
from sarkit.llm.base import Answer, BackendError, BackendFatal, Model, Request

NAME = "openai"
OPENAI_URL = "https://api.openai.com/v1"
KEY_ENVS = ("SARKIT_API_KEY", "OPENAI_API_KEY")
KEYS_FILE_ENV = "SARKIT_KEYS_FILE"
DEFAULT_KEYS_FILE = Path("~/.config/sarkit/keys.json")
MAX_RETRY_AFTER_S = 60.0
#: connection-level failures in a row (any tiles, no answer between) that end the run: a
#: dead endpoint would otherwise cost every tile its whole retry schedule
CONNECT_STREAK = 4

MODELS = [
    Model(
        "gpt-4.1",
        NAME,
        price_in=2.0,
        price_out=8.0,
        json_schema=True,
        needs_key=True,
        base_url=OPENAI_URL,
        description="OpenAI GPT-4.1 (the paper's engine)",
    ),
    Model(
        "gpt-4.1-mini",
        NAME,
        price_in=0.4,
        price_out=1.6,
        json_schema=True,
        needs_key=True,
        base_url=OPENAI_URL,
        description="OpenAI GPT-4.1 mini",
    ),
    Model(
        "gpt-4.1-nano",
        NAME,
        price_in=0.1,
        price_out=0.4,
        json_schema=True,
        needs_key=True,
        base_url=OPENAI_URL,
        description="OpenAI GPT-4.1 nano",
    ),
    Model(
        "gpt-4o",
        NAME,
        price_in=2.5,
        price_out=10.0,
        json_schema=True,
        needs_key=True,
        base_url=OPENAI_URL,
        description="OpenAI GPT-4o",
    ),
    Model(
        "gpt-4o-mini",
        NAME,
        price_in=0.15,
        price_out=0.6,
        json_schema=True,
        needs_key=True,
        base_url=OPENAI_URL,
        description="OpenAI GPT-4o mini",
    ),
    Model(
        "qwen2.5-vl",
        NAME,
        model_id="Qwen/Qwen2.5-VL-7B-Instruct",
        json_schema=True,
        base_url="http://localhost:8000/v1",
        description="Qwen2.5-VL served by vLLM",
    ),
    Model(
        "llava",
        NAME,
        model_id="llava",
        base_url="http://localhost:11434/v1",
        description="LLaVA served by Ollama (labelled-line answers)",
    ),
    Model(
        "local",
        NAME,
        model_id="local",
        json_schema=True,
        base_url="http://localhost:8000/v1",
        description="any OpenAI-compatible server: give --base-url and --model-id",
    ),
]


def api_key(keys_file: str | None = None, required: bool = False) -> str | None:
    """The key from --keys-file, else SARKIT_API_KEY or OPENAI_API_KEY, else the keys file
    of SARKIT_KEYS_FILE or ~/.config/sarkit/keys.json ({"openai": KEY}).

    A --keys-file must exist; any keys file read must be a JSON object, and one that was
    named (option or variable) or is needed (`required`) must hold an entry for this
    backend. Errors name the file, never a byte of its content."""
    if keys_file:
        return _key_from_file(Path(keys_file).expanduser(), "--keys-file", True)
    for env in KEY_ENVS:
        value = os.environ.get(env, "").strip()
        if value:
            return value
    named = os.environ.get(KEYS_FILE_ENV)
    path = keys_file_path()
    if not path.exists():
        return None
    return _key_from_file(path, KEYS_FILE_ENV if named else "", required or bool(named))


def keys_file_path() -> Path:
    """The keys file read when neither --keys-file nor a key variable is set."""
    return Path(os.environ.get(KEYS_FILE_ENV) or DEFAULT_KEYS_FILE).expanduser()


def _key_from_file(path: Path, given_as: str, need_entry: bool) -> str | None:
    where = f"{path} ({given_as})" if given_as else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SarkitError(f"{where}: no such keys file") from None
    except IsADirectoryError:
        raise SarkitError(f"{where}: is a folder, expected a JSON keys file") from None
    except UnicodeDecodeError:
        raise SarkitError(
            f'{where}: not UTF-8 text, expected JSON like {{"openai": KEY}}'
        ) from None
    except OSError as exc:
        raise SarkitError(f"{where}: cannot read the keys file ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:  # its message quotes no content, only a position
        raise SarkitError(
            f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}); expected "
            '{"openai": "KEY"}'
        ) from None
    if not isinstance(data, dict):
        raise SarkitError(f'{where}: expected a JSON object like {{"openai": "KEY"}}')
    for name in (NAME, "default"):
        value = data.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    if need_entry:
        raise SarkitError(f'{where}: no "{NAME}" entry with a key (expected {{"openai": "KEY"}})')
    return None


def check_url(url: str, given_as: str) -> str:
    """An http(s) URL with a host, or a usage error before the first request."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        hint = f"; did you mean http://{url}" if "://" not in url else ""
        raise UsageError(f"{given_as} '{url}' is not an http:// or https:// URL{hint}")
    return url


class Retryable(Exception):
    """A transient failure worth another attempt (after Retry-After when the server says)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def image_tokens(width: int, height: int) -> int:
    """OpenAI's high-detail image token count: 85 + 170 per 512-pixel tile after scaling."""
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * (-(-int(w) // 512)) * (-(-int(h) // 512))


def json_schema(task: Any) -> dict:
    props = {name: {"type": "string"} for name in task.field_names}
    return {
        "type": "json_schema",
        "json_schema": {
            "name": f"hcot_{task.name}",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": props,
                "required": list(task.field_names),
                "additionalProperties": False,
            },
        },
    }


class OpenAIClient:
    def __init__(self, model: Model, options: Any):
        import httpx

        self.model = model
        given = getattr(options, "base_url", None)
        env_url = os.environ.get("OPENAI_BASE_URL") if model.base_url == OPENAI_URL else None
        self.base_url = check_url(
            given or env_url or model.base_url or OPENAI_URL,
            "--base-url" if given else ("OPENAI_BASE_URL" if env_url else f"--llm {model.name}"),
        ).rstrip("/")
        self.model_id = getattr(options, "model_id", None) or model.sent_id
        dry = bool(getattr(options, "dry_run", False))
        needed = model.needs_key and self.base_url == OPENAI_URL and not dry
        self._key = api_key(getattr(options, "keys_file", None), required=needed)
        if self._key is None and model.needs_key and self.base_url == OPENAI_URL and not dry:
            raise BackendFatal(
                f"--llm {model.name} needs an API key: set OPENAI_API_KEY or SARKIT_API_KEY, "
                f'or write {{"openai": "KEY"}} to {keys_file_path()} (or --keys-file)'
            )
        self.timeout = float(getattr(options, "timeout", 120.0))
        self.retries = int(getattr(options, "retries", 6))
        self.max_tokens = int(getattr(options, "max_tokens", 1200))
        self.temperature = float(getattr(options, "temperature", 0.2))
        self.stop = getattr(options, "stop_event", None) or threading.Event()
        self.use_schema = model.json_schema
        concurrency = max(1, int(getattr(options, "concurrency", 8)))
        # at most `concurrency` requests on the wire; a few more threads may prepare the
        # next tiles (read, PNG, prompt) meanwhile, so preparation never idles a slot
        self._slots = threading.BoundedSemaphore(concurrency)
        self.prefetch = min(concurrency, 4)
        self._streak = 0  # connection-level failures in a row, over all threads
        self._streak_lock = threading.Lock()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 30.0)),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    # -- helpers ---------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        """Remove the key from any text that might reach a log, a record or an error."""
        if self._key and self._key in text:
            text = text.replace(self._key, "***")
        return text

    def estimate(self, request: Request) -> tuple[int, int]:
        """(input tokens, most output tokens) for dry runs and the --max-cost budget."""
        text_tokens = (len(request.system) + len(request.user)) // 3 + 20
        side = request.image_size
        return text_tokens + image_tokens(side, side), self.max_tokens

    def _messages(self, request: Request, repair: tuple[str, str] | None) -> list[dict]:
        from sarkit.llm.image import png_data_url

        url, _ = png_data_url(request.image_path, request.image_size)
        messages = [
            {"role": "system", "content": request.system},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": request.user},
                    {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
                ],
            },
        ]
        if repair is not None:
            messages.append({"role": "assistant", "content": repair[0]})
            messages.append({"role": "user", "content": repair[1]})
        return messages

    def _attempt(self, body: dict) -> dict:
        import httpx

        if self.stop.is_set():
            raise BackendError("interrupted")
        try:
            with self._slots:
                if self.stop.is_set():
                    raise BackendError("interrupted")
                response = self._http.post("/chat/completions", json=body)
        except httpx.UnsupportedProtocol as exc:
            raise BackendFatal(f"{self.base_url}: unsupported URL ({exc})") from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self._unreachable(exc)
            raise Retryable(f"connection failed: {type(exc).__name__}: {exc}") from None
        except httpx.TimeoutException as exc:
            raise Retryable(f"timed out after {self.timeout:g} s ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise Retryable(f"connection failed: {type(exc).__name__}: {exc}") from None
        with self._streak_lock:
            self._streak = 0  # the server answered: whatever failed before was passing
        status = response.status_code
        if status == 429 or status >= 500:
            raise Retryable(
                f"HTTP {status}", parse_retry_after(response.headers.get("retry-after"))
            )
        if status in (401, 403):
            raise BackendFatal(f"{self.base_url} refused the API key (HTTP {status})")
        if status == 404:
            raise BackendFatal(
                f"{self.base_url}/chat/completions or model '{self.model_id}' not found (HTTP 404)"
            )
        if status == 400 and "response_format" in body and _mentions_format(response.text):
            raise _SchemaRejected()
        if status >= 400:
            raise BackendError(f"HTTP {status}: {self.scrub(response.text[:300])}")
        try:
            data = response.json()
            message = data["choices"][0]["message"]
            content = message.get("content") or ""
            if not isinstance(content, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise Retryable(f"malformed response body ({type(exc).__name__})") from None
        return data

    def _unreachable(self, exc: Exception) -> None:
        """Count a failure to connect (refused, DNS, TLS, connect timeout); a few in a row
        with no answer between stop the run instead of costing every tile its retries."""
        with self._streak_lock:
            self._streak += 1
            streak = self._streak
        if streak >= CONNECT_STREAK:
            reason = self.scrub(str(exc)) or type(exc).__name__
            raise BackendFatal(
                f"{self.base_url}: cannot connect ({type(exc).__name__}: {reason}; "
                f"{streak} attempts in a row failed); is the server running?"
            ) from None

    def _post(self, body: dict) -> tuple[dict, int]:
        import tenacity

        attempts = 0

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            after = getattr(exc, "retry_after", None)
            if after is not None:
                return min(after, MAX_RETRY_AFTER_S) + 0.1 * _jitter()
            # exponential backoff with full jitter on top: 0.5, 1, 2, 4 ... s (at most 20)
            return min(20.0, 0.5 * 2 ** (state.attempt_number - 1)) + 0.5 * _jitter()

        def note(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.debug(f"retry {state.attempt_number}/{self.retries}: {self.scrub(str(exc))}")

        def once() -> dict:
            nonlocal attempts
            attempts += 1
            return self._attempt(body)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.retries + 1),
            wait=wait,
            retry=tenacity.retry_if_exception_type(Retryable),
            before_sleep=note,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(once), attempts
        except Retryable as exc:
            raise BackendError(
                f"gave up after {attempts} attempts: {self.scrub(str(exc))}"
            ) from None

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise BackendError("interrupted")

    # -- the client API ----------------------------------------------------------------
    def complete(self, request: Request, repair: tuple[str, str] | None = None) -> Answer:
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": self._messages(request, repair),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.use_schema:
            body["response_format"] = json_schema(request.task)
        try:
            data, attempts = self._post(body)
        except _SchemaRejected:
            log.warn(f"{self.base_url} does not take a JSON schema; reading labelled lines")
            self.use_schema = False
            body.pop("response_format", None)
            data, attempts = self._post(body)
        content = data["choices"][0]["message"].get("content") or ""
        usage = data.get("usage") or {}
        fields = None
        try:
            parsed = json.loads(content)
            if isinstance(parsed, dict):
                fields = {str(k): v for k, v in parsed.items() if isinstance(v, str)}
        except json.JSONDecodeError:
            pass
        return Answer(
            text=content,
            fields=fields,
            tokens_in=int(usage.get("prompt_tokens") or 0),
            tokens_out=int(usage.get("completion_tokens") or 0),
            attempts=attempts,
        )

    def close(self) -> None:
        self._http.close()


class _SchemaRejected(Exception):
    pass


def _mentions_format(text: str) -> bool:
    lowered = text.lower()
    return "response_format" in lowered or "json_schema" in lowered


def _jitter() -> float:
    import random

    return random.random()


class OpenAIBackend:
    """Registered through `sarkit_llm_backends`; serves the models in `MODELS`."""

    name = NAME

    def __init__(self) -> None:
        self.models = list(MODELS)

    def connect(self, model: Model, options: Any) -> OpenAIClient:
        return OpenAIClient(model, options)
