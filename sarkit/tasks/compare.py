"""`sarkit eval --compare`: the paper's Table 4 layout from run folders.

Rows are inits (backbones), columns task metrics; a cell is the run's latest ``sarkit eval``
measurement when there is one (``eval/TASK.json``), else its settled fine-tune metric (mean
of the last 5 epochs, results.json). In the Markdown the best of a column is bold and the
second underlined.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from sarkit.errors import SarkitError
from sarkit.tasks import runfolder
from sarkit.tasks.backbone import init_label


def run_row(run: Path) -> tuple[str, str, dict[str, float]]:
    """(init label, task, metrics) of one run folder."""
    config = runfolder.read_config(run)
    task = config["task"]
    label = init_label(config.get("init") or {})
    measured = Path(run) / "eval" / f"{task}.json"
    if measured.exists():
        metrics = runfolder.read_json(measured, "eval result").get("metrics") or {}
    else:
        results = Path(run) / "results.json"
        if not results.exists():
            raise SarkitError(f"{run}: no results.json nor eval/{task}.json (unfinished run?)")
        metrics = runfolder.read_json(results, "results").get("settled") or {}
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    return label, task, metrics


def table(runs: list[Path]) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """(row labels, column names 'task:metric', cells)."""
    rows: list[str] = []
    columns: list[str] = []
    cells: dict[tuple[str, str], float] = {}
    for run in runs:
        label, task, metrics = run_row(run)
        if label in rows and any((label, f"{task}:{m}") in cells for m in metrics):
            label = f"{label} ({Path(run).name})"
        if label not in rows:
            rows.append(label)
        for name, value in metrics.items():
            column = f"{task}:{name}"
            if column not in columns:
                columns.append(column)
            cells[(label, column)] = value
    return rows, columns, cells


def _ranks(rows: list[str], column: str, cells: dict) -> dict[str, int]:
    values = sorted({cells[(r, column)] for r in rows if (r, column) in cells}, reverse=True)
    return {r: values.index(cells[(r, column)]) for r in rows if (r, column) in cells}


def markdown(rows: list[str], columns: list[str], cells: dict) -> str:
    """Best of each column in bold, second underlined (<u>), as the paper's Table 4."""
    lines = ["| init | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    ranks = {c: _ranks(rows, c, cells) for c in columns}
    for r in rows:
        out = []
        for c in columns:
            if (r, c) not in cells:
                out.append("")
                continue
            text = (
                f"{100 * cells[(r, c)]:.2f}" if abs(cells[(r, c)]) <= 1 else f"{cells[(r, c)]:.2f}"
            )
            rank = ranks[c].get(r)
            several = len(set(ranks[c].values())) > 1
            if rank == 0 and several:
                text = f"**{text}**"
            elif rank == 1:
                text = f"<u>{text}</u>"
            out.append(text)
        lines.append(f"| {r} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[str], columns: list[str], cells: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["init", *columns])
    for r in rows:
        writer.writerow([r, *(f"{cells[(r, c)]:.6f}" if (r, c) in cells else "" for c in columns)])
    return buf.getvalue()


def as_json(rows: list[str], columns: list[str], cells: dict) -> str:
    return json.dumps({r: {c: cells[(r, c)] for c in columns if (r, c) in cells} for r in rows})
