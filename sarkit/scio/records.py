"""Which records SCIO can judge; the others pass through unchanged, counted by reason."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from sarkit import log

REASONS = {
    "segments": "fewer than 2 non-empty segments",
    "fields": "fields outside the run's layout",
    "tile": "unreadable tile",
    "unusable": "filtered out, failed caption or no texts",
}


def problem(record: dict, fields: Sequence[str]) -> str | None:
    """Why a record cannot be screened (a key of REASONS), or None."""
    quality = record.get("quality") if isinstance(record.get("quality"), dict) else {}
    caption = record.get("caption") if isinstance(record.get("caption"), dict) else {}
    texts = record.get("texts")
    if quality.get("keep") is False or caption.get("failed") or not isinstance(texts, dict):
        return "unusable"
    if any(key not in fields for key in texts):
        return "fields"
    if sum(1 for f in fields if str(texts.get(f) or "").strip()) < 2:
        return "segments"
    return None


class Skipped:
    """Records passed through, counted by reason; the first of each named on stderr."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def add(self, record: dict, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if reason not in self.first:
            rid = record.get("id", "?")
            self.first[reason] = rid
            log.warn(f"scio: record {rid}: {REASONS[reason]}{detail}; passed through unchanged")

    def summary(self) -> str:
        return ", ".join(f"{n} {REASONS[r]}" for r, n in sorted(self.counts.items()))
