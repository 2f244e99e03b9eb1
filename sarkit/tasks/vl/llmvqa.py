"""`sarkit eval vqa --llm NAME --data vqa.jsonl`: a general LLM answers the same questions
(the paper's Table 7), through the caption stage's backends (``sarkit_llm_backends``).

Each held-out question goes with its image (PNG data URL, as the caption stage sends tiles)
and a short instruction to answer with a number or a short phrase. A question the backend
fails on (retries exhausted) or answers with nothing is counted as unanswered, named on
stderr, and scored as wrong: never left out of the accuracy.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sarkit import log
from sarkit.errors import SarkitError, UsageError

SYSTEM = (
    "You answer questions about one synthetic aperture radar (SAR) image. Reply with the "
    "answer only, no explanation: a number for counts and for regions (the image is a 3x3 "
    "grid numbered 1 to 9 row by row from the upper left), otherwise a short phrase (a "
    "target class, a land-cover name, or several names separated by commas)."
)


def answer_text(content: str) -> str:
    """The answer from a reply: its first non-empty line, without an 'Answer:' label,
    quotes or a final full stop."""
    for line in str(content or "").splitlines():
        line = line.strip().strip("*").strip()
        if not line:
            continue
        line = re.sub(r"^(final\s+)?answer\s*[:\-]\s*", "", line, flags=re.I)
        return line.strip().strip("\"'`").rstrip(".").strip()
    return ""


def backend_of(name: str) -> tuple[Any, Any]:
    """(backend, model) of ``--llm NAME``; the offline captioner cannot answer questions."""
    from sarkit.llm.registry import resolve

    backend, model = resolve(name)
    if backend.name == "offline":
        raise UsageError(
            f"--llm {name}: the offline captioner writes captions, it does not answer "
            "questions; use an OpenAI-compatible model (--base-url for a local server)"
        )
    return backend, model


def connect(name: str, extra: dict) -> tuple[Any, Any]:
    from sarkit.llm.base import BackendFatal

    backend, model = backend_of(name)
    options = SimpleNamespace(
        base_url=extra.get("base_url"),
        model_id=extra.get("model_id"),
        keys_file=extra.get("keys_file"),
        timeout=120.0,
        retries=4,
        max_tokens=32,
        temperature=0.0,
        concurrency=int(extra.get("concurrency") or 4),
    )
    try:
        client = backend.connect(model, options)
    except BackendFatal as exc:
        raise SarkitError(f"--llm {name}: {exc}") from None
    if hasattr(client, "use_schema"):
        client.use_schema = False  # a free answer, not the caption schema
    return client, model


def evaluate_llm(options: Any) -> dict:
    """Ask the held-out questions of ``options.data``; the record ``sarkit eval`` prints."""
    from sarkit.llm.base import BackendError, BackendFatal, Request
    from sarkit.tasks.vl.data import check_rows, load_jsonl
    from sarkit.tasks.vl.heads import write_jsonl
    from sarkit.tasks.vl.metrics import vqa_accuracy
    from sarkit.train.data import resolve_path

    extra = options.extra
    name = str(extra["llm"])
    backend_of(name)  # a usage error before any data is read
    if not options.data:
        raise UsageError("eval vqa --llm needs --data (the builder's vqa.jsonl)")
    rows = check_rows(load_jsonl(options.data), str(options.data), "vqa")
    if any("split" in r for r in rows):
        rows = [r for r in rows if r.get("split") in ("test", "val")]
    limit = extra.get("limit")
    if limit:
        rows = rows[: int(limit)]
    if not rows:
        raise SarkitError(f"{options.data}: no question in the test split")
    base = Path(options.data).parent
    client, model = connect(name, extra)
    failed: list[tuple[str, str]] = []

    def ask(row: dict) -> str | None:
        path = resolve_path(str(row["path"]), base)
        request = Request(
            record={"id": row.get("id")},
            task=None,
            system=SYSTEM,
            user=f"Question: {row['question']}",
            image_path=str(path),
            image_size=int(extra.get("image_size") or 512),
        )
        try:
            reply = client.complete(request)
        except BackendError as exc:
            failed.append((str(row.get("id")), str(exc)))
            return None
        text = answer_text(reply.text)
        if not text:
            failed.append((str(row.get("id")), "empty answer"))
            return None
        return text

    try:
        with ThreadPoolExecutor(max(1, int(extra.get("concurrency") or 4))) as pool:
            answers = list(pool.map(ask, rows))
    except BackendFatal as exc:
        raise SarkitError(f"--llm {name}: {exc}") from None
    finally:
        close = getattr(client, "close", None)
        if close:
            close()
    if failed:
        first_id, why = failed[0]
        log.warn(f"{len(failed)} question(s) unanswered by {name} (first: {first_id}: {why})")
    items = [
        {
            "id": r.get("id"),
            "type": r["type"],
            "question": r["question"],
            "answer": r["answer"],
            "prediction": a,
        }
        for r, a in zip(rows, answers, strict=True)
    ]
    metrics = vqa_accuracy(items)
    figures = []
    if options.figures:
        figures.append(str(write_jsonl(Path(options.figures) / f"vqa_{name}.jsonl", items)))
    return {
        "task": "vqa",
        "run": None,
        "llm": name,
        "data": str(options.data),
        "metrics": metrics,
        "figures": figures,
    }
