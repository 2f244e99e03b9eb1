"""Text analysis of a caption dataset (the paper's Figs. 10 and 11), per field.

Per field: texts, tokens per text (mean, median), MTLD lexical diversity (McCarthy and
Jarvis 2010, threshold 0.72, via the ``lexicalrichness`` package, on lower-case word
tokens) of the field's texts joined in record order (a single short caption is too short
for a stable MTLD), distinct n-grams (distinct / total, n = 1, 2), and the duplicate rate
(share of texts equal to an earlier text of the same field, compared as lower-case
words). Empty texts are counted apart, never scored as zero.

What it reads: sarkit records (``texts``: one entry per field), the builder's files
(``captions``: field ``caption``) and the authors' JSON list of caption dicts
(``fusar_klip_caption_part1.json``: one key per field).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from sarkit.errors import SarkitError

ID_KEYS = {"id", "image_id", "image", "path", "split", "file_name"}


def tokens(text: str) -> list[str]:
    """Lower-case words and numbers, punctuation dropped ("2 ships." -> ["2", "ships"]).

    lexicalrichness' own preprocessing drops digits, which would make "2 ships" and
    "3 ships" one text; its MTLD is run on these tokens instead.
    """
    return re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", str(text).lower())


def mtld(words: Sequence[str], threshold: float = 0.72) -> float:
    """MTLD of a word sequence (lexicalrichness' bidirectional implementation)."""
    from lexicalrichness import LexicalRichness

    if not words:
        return float("nan")
    lex = LexicalRichness(" ".join(words), preprocessor=None, tokenizer=str.split)
    return float(lex.mtld(threshold=threshold))


def distinct(texts_tokens: Iterable[Sequence[str]], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts (each text's n-grams, not across)."""
    grams = [tuple(t[i : i + n]) for t in texts_tokens for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def field_stats(texts: Sequence[str]) -> dict[str, float]:
    kept = [t for t in texts if str(t or "").strip()]
    toks = [tokens(t) for t in kept]
    counts = [len(t) for t in toks]
    seen: set[str] = set()
    dup = 0
    for t in toks:  # equal after lower-casing and dropping punctuation
        key = " ".join(t)
        dup += key in seen
        seen.add(key)
    joined = [w for t in toks for w in t]
    return {
        "texts": float(len(kept)),
        "empty": float(len(texts) - len(kept)),
        "tokens_mean": float(np.mean(counts)) if counts else float("nan"),
        "tokens_median": float(np.median(counts)) if counts else float("nan"),
        "mtld": mtld(joined),
        "distinct1": distinct(toks, 1),
        "distinct2": distinct(toks, 2),
        "duplicate_rate": dup / len(kept) if kept else float("nan"),
        "vocabulary": float(len(set(joined))),
    }


def read_texts(path: Path) -> dict[str, list[str]]:
    """{field: texts in record order} from any of the inputs in the module doc."""
    path = Path(path)
    if not path.is_file():
        raise SarkitError(f"{path}: no such file")
    raw = path.read_text(encoding="utf-8", errors="replace")
    rows: list[dict] = []
    if raw.lstrip().startswith("["):
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise SarkitError(f"{path}: not valid JSON ({exc})") from None
        rows = [r for r in data if isinstance(r, dict)]
    else:
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise SarkitError(f"{path}:{n}: not a JSON record") from None
            if not isinstance(rec, dict):
                raise SarkitError(f"{path}:{n}: not a JSON object")
            if isinstance(rec.get("texts"), dict):
                rows.append(rec["texts"])
            elif isinstance(rec.get("captions"), list):
                rows.extend({"caption": c} for c in rec["captions"])
            elif isinstance(rec.get("caption"), str):
                rows.append({"caption": rec["caption"]})
    fields: dict[str, list[str]] = {}
    for row in rows:
        for key, value in row.items():
            if key in ID_KEYS or not isinstance(value, (str, type(None))):
                continue
            fields.setdefault(key, []).append(str(value or ""))
    if not fields:
        raise SarkitError(f"{path}: no texts found (expected 'texts', 'captions' or text fields)")
    return fields


def analyse(path: Path) -> dict[str, dict[str, float]]:
    """Per-field statistics, plus ``all`` (every field's texts together)."""
    fields = read_texts(path)
    out = {name: field_stats(texts) for name, texts in fields.items()}
    if len(fields) > 1:
        out["all"] = field_stats([t for texts in fields.values() for t in texts])
    return out


COLUMNS = ("texts", "tokens_mean", "mtld", "distinct1", "distinct2", "duplicate_rate")


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A plain-text table: one row per (dataset, field)."""
    head = ["dataset", "field", *COLUMNS]
    rows = [head]
    for name, stats in results.items():
        for fname, s in stats.items():
            rows.append(
                [name, fname, *(f"{s[c]:.3f}" if c != "texts" else f"{s[c]:.0f}" for c in COLUMNS)]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def tsne_plot(records_path: Path, run: Path, out_png: Path, limit: int = 500, seed: int = 0) -> int:
    """2-D t-SNE of a run's image and text ITC features of the records; returns points drawn.

    Records need ``path`` (the tile) and texts; features come from ``KnowLIP.from_run``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from sklearn.manifold import TSNE

    from sarkit.atomic import atomic_path
    from sarkit.tasks.vl.data import FeatureModel, load_jsonl

    rows = [r for r in load_jsonl(records_path) if r.get("path")][:limit]
    if len(rows) < 3:
        raise SarkitError(f"{records_path}: --plot needs at least 3 records with an image 'path'")
    vl = FeatureModel.load(run)
    texts = [vl.text_of(r) for r in rows]
    base = Path(records_path).parent
    with torch.no_grad():
        img = vl.image_features([r["path"] for r in rows], base)
        txt = vl.text_features(texts)
    feats = torch.cat([img, txt]).numpy()
    perplexity = float(min(30, max(2, (len(feats) - 1) // 3)))
    xy = TSNE(2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(feats)
    n = len(rows)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
    ax.scatter(xy[:n, 0], xy[:n, 1], s=10, c="tab:blue", label="image")
    ax.scatter(xy[n:, 0], xy[n:, 1], s=10, c="tab:orange", label="text", marker="^")
    ax.legend()
    ax.set_title(f"t-SNE of {n} image and text features ({Path(run).name})")
    ax.set_xticks([])
    ax.set_yticks([])
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return 2 * n
