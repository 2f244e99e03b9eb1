"""A fine-tune run folder: what it holds and how `eval` and `--compare` read it back.

::

    config.json        task, sarkit version, the init's provenance, the backbone (timm name,
                       image size, mean/std, crop), the head's config (classes ...), options
    split.json         the items trained on and held out, and how the split was made
    metrics.csv        per-step training scalars (the loop's); eval.csv: held-out metrics
                       per epoch
    best.safetensors   weights at the best epoch by the head's primary metric (best.json)
    last.safetensors   weights at the end
    results.json       last-epoch and settled (mean of the last 5 epochs) metrics
    checkpoints/       the loop's resumable state (--resume latest)
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from sarkit import __version__
from sarkit.atomic import write_text
from sarkit.errors import SarkitError

SETTLED_EPOCHS = 5


def json_safe(value: Any) -> Any:
    if is_dataclass(value):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def options_dict(options: Any) -> dict:
    """The options as plain JSON (never a pickled object: config.json is read by anyone)."""
    return {f.name: json_safe(getattr(options, f.name)) for f in fields(options)}


def write_config(out: Path, task: str, options: Any, head_config: dict) -> Path:
    config = {
        "task": task,
        "sarkit_version": __version__,
        **json_safe(head_config),
        "options": options_dict(options),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    write_text(path, json.dumps(config, indent=2) + "\n")
    return path


def write_split(out: Path, split: Any) -> Path:
    path = out / "split.json"
    write_text(path, json.dumps(json_safe(split), indent=2) + "\n")
    return path


def read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise SarkitError(f"{path}: missing ({what})") from None
    except (OSError, ValueError) as exc:
        raise SarkitError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise SarkitError(f"{path}: not a JSON object ({what})")
    return value


def read_config(run: Path) -> dict:
    """A run's config.json, or an error saying the folder is not a fine-tune run."""
    if not Path(run).is_dir():
        raise SarkitError(f"{run}: not a run folder")
    config = read_json(Path(run) / "config.json", "not a sarkit fine-tune run?")
    if "task" not in config:
        raise SarkitError(f"{run}/config.json: no 'task' (not a sarkit fine-tune run)")
    return config


def weights_path(run: Path, which: str) -> Path:
    path = Path(run) / f"{which}.safetensors"
    if not path.exists():
        raise SarkitError(f"{path}: missing (the run has not finished; --weights best|last)")
    return path


def eval_rows(run: Path) -> list[dict[str, float]]:
    """eval.csv as numbers, one row per evaluation (the last row of a step wins)."""
    path = Path(run) / "eval.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        rows = []
        for row in csv.DictReader(fh):
            try:
                rows.append({k: float(v) for k, v in row.items() if v not in (None, "")})
            except ValueError:
                continue
    return rows


def summarise(run: Path, primary: str) -> dict:
    """Last-epoch, settled (mean of the last 5 evaluations) and best metrics of a run."""
    rows = eval_rows(run)
    if not rows:
        return {}
    names = [k for k in rows[-1] if k not in ("step", "epoch")]
    tail = rows[-SETTLED_EPOCHS:]
    settled = {k: sum(r.get(k, 0.0) for r in tail) / len(tail) for k in names}
    best = max(rows, key=lambda r: r.get(primary, float("-inf")))
    return {
        "primary": primary,
        "evaluations": len(rows),
        "last": {k: rows[-1][k] for k in names},
        "settled": settled,
        "settled_over": len(tail),
        "best": {"epoch": best.get("epoch"), "step": best.get("step"), primary: best.get(primary)},
    }


def write_results(run: Path, primary: str) -> dict:
    results = summarise(run, primary)
    if results:
        write_text(Path(run) / "results.json", json.dumps(results, indent=2) + "\n")
    return results
