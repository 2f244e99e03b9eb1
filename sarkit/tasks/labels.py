"""Labelled image lists for classification: class folders, a CSV, or records with `label`.

* a folder with ``train/`` and ``val/`` (or ``test/``) subfolders of class folders (the
  MSTAR layout): the split as given;
* a folder of class folders: a seeded split (``val_fraction``, the paper's 4:1);
* a CSV of ``path,label`` rows (a header row is allowed), paths relative to the CSV;
* JSON Lines records with ``path`` and ``label`` (and ``split`` train/val when given).

An empty class folder is an error naming it; a CSV/record row without a path or label is
an error naming the line.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from sarkit.errors import SarkitError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
VAL_NAMES = ("val", "test", "valid", "validation")


def natural_key(name: str) -> list:
    """Sort '2' before '10' (MSTAR's class folders are numbers)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass
class Labelled:
    train: list[tuple[Path, str]]
    val: list[tuple[Path, str]] | None  # None: the data gives no split
    classes: list[str]


def class_folders(root: Path) -> list[tuple[Path, str]]:
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name))
    if not folders:
        raise SarkitError(f"{root}: no class folders")
    items = []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SarkitError(f"{folder}: empty class folder (no images)")
        items.extend((p, folder.name) for p in files)
    return items


def read_csv(path: Path) -> list[tuple[Path, str]]:
    items = []
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.reader(fh), start=1):
            if not row or not "".join(row).strip():
                continue
            if i == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise SarkitError(f"{path}:{i}: expected 'path,label'")
            p = Path(row[0].strip())
            items.append((p if p.is_absolute() else path.parent / p, row[1].strip()))
    if not items:
        raise SarkitError(f"{path}: no rows")
    return items


def read_records(path: Path) -> tuple[list, list]:
    train, val = [], []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                p, label = rec["path"], rec["label"]
            except (ValueError, KeyError, TypeError) as exc:
                raise SarkitError(
                    f"{path}:{i}: not a record with 'path' and 'label' ({exc})"
                ) from None
            p = Path(str(p))
            item = (p if p.is_absolute() else path.parent / p, str(label))
            (val if rec.get("split") in VAL_NAMES else train).append(item)
    if not train and not val:
        raise SarkitError(f"{path}: no records")
    return train, val


def load(data: str, val_data: str | None = None) -> Labelled:
    """The labelled items of `data` (and of `val_data` when given) and the class list."""
    root = Path(data)
    if not root.exists():
        raise SarkitError(f"--data {data}: no such file or folder")
    val: list | None = None
    if root.is_dir():
        sub = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
        held = next((sub[n] for n in VAL_NAMES if n in sub), None)
        if "train" in sub and held is not None:
            train, val = class_folders(sub["train"]), class_folders(held)
        else:
            train = class_folders(root)
    elif root.suffix.lower() == ".csv":
        train = read_csv(root)
    else:
        train, val = read_records(root)
        val = val or None
    if val_data:
        val = load(val_data).train
    classes = sorted({label for _, label in train}, key=natural_key)
    if val:
        unknown = sorted({label for _, label in val} - set(classes), key=natural_key)
        if unknown:
            raise SarkitError(
                f"{val_data or data}: held-out classes {unknown} have no training images"
            )
    return Labelled(train, val, classes)


def held_out(data: str) -> list[tuple[Path, str]]:
    """What `eval` measures on: the val/test part of `data`, else all of it."""
    labelled = load(data)
    return labelled.val if labelled.val else labelled.train
