"""A local OpenAI-compatible Chat Completions server with injected faults, for tests and benches.

It answers like a vision model would in form (the task's 8 fields, as JSON when a schema is
requested, else as labelled lines), with a fixed latency, and misbehaves on request: 429 with
Retry-After, 500, answers slower than the client's timeout, malformed JSON bodies, answers
missing fields, dropped connections. It counts every request and every good answer per tile
so a test can assert retries and exactly-once work.

Run standalone: ``python -m sarkit.llm.fakeserver --latency 0.3 --fault-rate 0.2`` prints
``PORT <n>`` and serves until killed.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "slow", "malformed", "missing", "drop")
TILE_RE = re.compile(r"Tile (\S+) from scene")
QUESTION_RE = re.compile(r"^Question: (.+)$", re.M)
FIELD_RE = re.compile(r"^([A-Za-z_]\w*): [^\n<]*<[^\n]*>$", re.M)


class FakeChatServer:
    """Start with `start()` (a background thread on 127.0.0.1), read `url`, `stop()` at the end."""

    def __init__(
        self,
        latency: float = 0.0,
        plan: dict[str, list[str]] | None = None,
        fault_rate: float = 0.0,
        fault_kinds: tuple[str, ...] = ("429", "500", "malformed", "drop"),
        retry_after: str = "1",
        slow_s: float = 3.0,
        api_key: str | None = None,
        schema: bool = True,
        seed: int = 0,
        port: int = 0,
        vqa_answers: dict[str, str] | None = None,
    ):
        self.latency = latency
        self.plan = {k: list(v) for k, v in (plan or {}).items()}
        self.fault_rate = fault_rate
        self.fault_kinds = fault_kinds
        self.retry_after = retry_after
        self.slow_s = slow_s
        self.api_key = api_key
        self.schema = schema
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()
        self.answered: collections.Counter = collections.Counter()  #: good full answers
        self.events: list[tuple[float, str, str]] = []  #: (time, tile, what happened)
        self.seen_auth: set[str] = set()
        self.bodies: list[dict] = []
        #: `eval vqa --llm`: "Question: Q" lines are answered from this (unknown Q: empty)
        self.vqa_answers = vqa_answers
        self._port = port
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeChatServer:
        handler = _make_handler(self)
        self._server = _Server(("127.0.0.1", self._port), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeChatServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fault_for(self, tile: str) -> str | None:
        with self.lock:
            self.requests[tile] += 1
            queue = self.plan.get(tile)
            if queue:
                return queue.pop(0) or None
            if self.fault_rate and self.rng.random() < self.fault_rate:
                return self.rng.choice(self.fault_kinds)
            return None

    def note(self, tile: str, what: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), tile, what))
            if what == "ok":
                self.answered[tile] += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen() backlog: many clients connect at once


def _fields_of(body: dict, user_text: str) -> list[str]:
    fmt = body.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema") or {}
    if schema.get("required"):
        return list(schema["required"])
    return FIELD_RE.findall(user_text)


def _user_text(body: dict) -> str:
    texts = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p.get("text", "") for p in content if p.get("type") == "text"]
    return "\n".join(texts)


def _make_handler(srv: FakeChatServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def setup(self) -> None:
            super().setup()
            # as real servers do: no Nagle delay between the header and the body writes
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            auth = self.headers.get("Authorization", "")
            with srv.lock:
                srv.seen_auth.add(auth)
            if not self.path.endswith("/chat/completions"):
                self._send(404, b'{"error": {"message": "not found"}}')
                return
            if srv.api_key is not None and auth != f"Bearer {srv.api_key}":
                self._send(401, b'{"error": {"message": "invalid api key"}}')
                return
            body = json.loads(raw)
            with srv.lock:
                srv.bodies.append(body)
            text = _user_text(body)
            m = TILE_RE.search(text)
            tile = m.group(1) if m else "?"
            if not srv.schema and "response_format" in body:
                self._send(400, b'{"error": {"message": "response_format is not supported"}}')
                return
            fault = srv.fault_for(tile)
            time.sleep(srv.latency)
            srv.note(tile, fault or "ok")
            if fault == "429":
                self._send(
                    429, b'{"error": {"message": "rate limited"}}', {"Retry-After": srv.retry_after}
                )
                return
            if fault == "500":
                self._send(500, b'{"error": {"message": "internal error"}}')
                return
            if fault == "drop":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if fault == "slow":
                time.sleep(srv.slow_s)
            if fault == "malformed":
                self._send(200, b'{"choices": [{"message": {"content": "trunc')
                return
            question = QUESTION_RE.search(text)
            if srv.vqa_answers is not None and question and "response_format" not in body:
                content = srv.vqa_answers.get(question.group(1).strip(), "")
                self._send(200, json.dumps(_completion(body, text, content)).encode())
                return
            fields = _fields_of(body, text)
            if fault in ("missing", "missing_always"):
                fields = fields[: max(0, len(fields) - 2)]
            values = {
                name: f"{name} of tile {tile}: statement {i + 1} about the SAR tile."
                for i, name in enumerate(fields)
            }
            if "response_format" in body:
                content = json.dumps(values)
            else:
                content = "Here is the analysis.\n" + "\n".join(
                    f"**{k}**: {v}" for k, v in values.items()
                )
            self._send(200, json.dumps(_completion(body, text, content)).encode())

    return Handler


def _completion(body: dict, text: str, content: str) -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": len(text) // 4 + 765, "completion_tokens": len(content) // 4},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--retry-after", default="1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats-file", help="write per-tile counts here on SIGTERM/SIGINT")
    args = parser.parse_args()
    srv = FakeChatServer(
        latency=args.latency,
        fault_rate=args.fault_rate,
        retry_after=args.retry_after,
        seed=args.seed,
        port=args.port,
    ).start()
    print(f"PORT {srv.url.split(':')[-1].split('/')[0]}", flush=True)
    import signal

    def dump(*_):
        if args.stats_file:
            with open(args.stats_file, "w") as fh:
                json.dump({"requests": srv.requests, "answered": srv.answered}, fh)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, dump)
    signal.signal(signal.SIGINT, dump)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
