"""Read the 8 fields out of an answer: a JSON object, or labelled lines found by regex."""

from __future__ import annotations

import json
import re

from sarkit.caption.templates import TaskSpec


def _strip_fence(text: str) -> str:
    m = re.search(r"```(?:json)?\s*(\{.*?\})\s*```", text, re.S)
    return m.group(1) if m else text


def _from_json(text: str, names: tuple[str, ...]) -> dict[str, str] | None:
    candidate = _strip_fence(text).strip()
    if not candidate.startswith("{"):
        start, end = candidate.find("{"), candidate.rfind("}")
        if start < 0 or end <= start:
            return None
        candidate = candidate[start : end + 1]
    try:
        data = json.loads(candidate)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    lower = {str(k).strip().lower(): v for k, v in data.items()}
    return {
        n: str(lower[n.lower()]).strip() for n in names if isinstance(lower.get(n.lower()), str)
    }


def _from_lines(text: str, names: tuple[str, ...]) -> dict[str, str]:
    """`Name: text` lines (markdown bold, bullets and numbering tolerated); text may wrap."""
    alternation = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    label = re.compile(
        rf"^[ \t]*(?:[-*#>]+[ \t]*|\d+[.)][ \t]*)?(?:\*\*|__)?({alternation})(?:\*\*|__)?"
        rf"[ \t]*(?:\*\*|__)?[ \t]*[:：\-–][ \t]*(?:\*\*|__)?",
        re.I | re.M,
    )
    found: dict[str, str] = {}
    matches = list(label.finditer(text))
    canon = {n.lower(): n for n in names}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        value = " ".join(text[m.end() : end].split())
        name = canon[m.group(1).lower()]
        if value and name not in found:
            found[name] = value
    return found


def extract(text: str, task: TaskSpec, structured: dict[str, str] | None = None) -> dict[str, str]:
    """The fields the answer gives, non-empty only, keyed by the task's field names."""
    names = task.field_names
    got: dict[str, str] = {}
    if structured:
        lower = {k.lower(): v for k, v in structured.items()}
        got = {n: lower[n.lower()].strip() for n in names if isinstance(lower.get(n.lower()), str)}
    if len([v for v in got.values() if v]) < len(names) and text:
        from_json = _from_json(text, names) or {}
        from_lines = _from_lines(text, names)
        for source in (from_json, from_lines):
            for n, v in source.items():
                if v and not got.get(n):
                    got[n] = v
    return {n: got[n] for n in names if got.get(n)}


def problem(fields: dict[str, str], task: TaskSpec) -> str | None:
    """None when all fields are there, else what is wrong, for the repair prompt and the record."""
    missing = [n for n in task.field_names if not fields.get(n)]
    if not missing:
        return None
    return "missing or empty field" + ("s " if len(missing) > 1 else " ") + ", ".join(missing)
