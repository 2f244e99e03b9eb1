"""The decoder's rewriting layout: ``[DEC] other segments [SEP]... label : segment [SEP]``.

A causal decoder trained on the whole text sees only the segments before the one it writes;
SCIO's stages train it on this layout instead (one target segment per sample), so a rewrite
reads the image and every other (trusted) segment, and the field label says which kind of
sentence to write. The segment's length is the decoder's own (it ends with [SEP]).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def label_tokens(codec: Any, field: str) -> list[int]:
    cache = codec.__dict__.setdefault("_label_cache", {})
    if field not in cache:
        cache[field] = codec.tokenizer(f"{field.lower()} :", add_special_tokens=False)["input_ids"]
    return cache[field]


def prefix(codec: Any, segments: Sequence[str], target: int, skip: Iterable[int] = ()) -> list[int]:
    """Context tokens for writing segment `target`: the other non-empty segments not in
    `skip` (each closed by [SEP]), then the target field's label."""
    skipped = set(skip) | {target}
    ids: list[int] = []
    for j, seg in enumerate(segments):
        if j in skipped or not seg.strip():
            continue
        ids += codec._tokens(seg) + [codec.sep_id]
    return ids + label_tokens(codec, codec.fields[target])


def trim(ids: list[int], budget: int) -> list[int]:
    """Keep the end of a prefix (the label and the segments nearest to it)."""
    return ids[max(0, len(ids) - budget) :]
