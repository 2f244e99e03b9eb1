"""The seeded split used when the data gives none (the paper's 4:1), stratified by label."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


def seeded_split(items: Sequence[tuple[Any, Any]], val_fraction: float, seed: int):
    """(train, val): `val_fraction` of each label's items held out, the same for a seed."""
    rng = random.Random(seed)
    by_label: dict[Any, list] = {}
    for item in items:
        by_label.setdefault(item[1], []).append(item)
    train, val = [], []
    for label in sorted(by_label, key=str):
        group = sorted(by_label[label], key=lambda it: str(it[0]))
        rng.shuffle(group)
        k = max(1, round(len(group) * val_fraction)) if len(group) > 1 else 0
        val.extend(group[:k])
        train.extend(group[k:])
    return train, val
