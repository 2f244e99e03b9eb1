"""The built-in filter stage: features in parallel, rules per tile, then kNN over the set.

Two passes keep memory flat in the number of records: pass 1 measures every tile (in
worker processes) and spills each record, its features added, to a temporary JSON Lines
file, keeping only the kNN feature matrix and a verdict code per tile in memory; pass 2
streams the spill back with score, keep and reason added. Records that already carry
``quality`` features of the same version (a ``--mark`` output run again with other
thresholds or seed labels) are not measured again. The matrix is a flat array of
doubles: 100 000 tiles x 26 features is 21 MB.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sarkit import log
from sarkit.errors import SarkitError
from sarkit.quality import FilterOptions
from sarkit.quality.features import FEATURES_VERSION, TileReadError, load_tile, tile_features
from sarkit.quality.rules import FAIL, PASS, QualityFilter

#: Keys the screening decides; everything else in ``quality`` is a measured feature.
DECISION_KEYS = ("score", "keep", "reason")

#: Records per task sent to a worker: large enough to amortise pickling, small for balance.
CHUNK = 8

_worker: dict[str, Any] = {}


def _init_worker(filters: list[QualityFilter], options: FilterOptions) -> None:
    if multiprocessing.parent_process() is not None:
        # Ctrl-C is the parent's to handle: it cancels the queue and stops the pool
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker["filters"] = filters
    _worker["options"] = options


def measure(path: str, filters: list[QualityFilter], options: FilterOptions) -> dict:
    """Features of one tile plus every filter's own measurements; raises TileReadError."""
    tile = load_tile(path, options.working_size)
    quality: dict[str, Any] = tile_features(tile)
    for flt in filters:
        quality.update(flt.measure(tile))
    quality["version"] = version(options)
    return quality


def version(options: FilterOptions) -> str:
    """Names the feature definitions, so a later run knows whether it may reuse them."""
    return f"{FEATURES_VERSION}/w{options.working_size}"


def _measure_chunk(paths: list[str | None]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for path in paths:
        if path is None:
            out.append(("reuse", None))
            continue
        try:
            out.append(("ok", measure(path, _worker["filters"], _worker["options"])))
        except TileReadError as exc:
            out.append(("missing" if "not found" in str(exc) else "unreadable", str(exc)))
    return out


def reusable(record: dict, filters: list[QualityFilter], options: FilterOptions) -> bool:
    """Whether a record's ``quality`` from an earlier run can stand in for measuring again.

    It can when the feature definitions match and every active filter names the features
    it needs and finds them (a filter that names none is always measured afresh).
    """
    quality = record.get("quality")
    if options.remeasure or not isinstance(quality, dict):
        return False
    if quality.get("version") != version(options):
        return False
    for flt in filters:
        needs = getattr(flt, "needs", None)
        if needs is None or any(key not in quality for key in needs):
            return False
    return True


def resolve_path(record: dict) -> str:
    path = record.get("path")
    if not isinstance(path, str) or not path:
        raise TileReadError("record has no tile 'path'")
    return path


@dataclass
class _Pass1:
    """What pass 1 keeps in memory: one row and one verdict per good tile."""

    values: array = field(default_factory=lambda: array("d"))  # rows x width, flat
    width: int = 0
    n: int = 0
    fail_reason: list[str | None] = field(default_factory=list)
    fail_seed: list[bool] = field(default_factory=list)  # the failing filter's drop_seeds
    clear_pass: list[bool] = field(default_factory=list)
    seed_rows: dict[str, int] = field(default_factory=dict)  # labelled id -> row


def _chunks(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _measured(
    records: Iterable[dict], filters: list[QualityFilter], options: FilterOptions
) -> Iterator[tuple[dict, str, Any]]:
    """Yield (record, status, quality-or-message) in input order, measuring in parallel."""

    def paths_of(batch: list[dict]) -> list[str | None]:
        out: list[str | None] = []
        for rec in batch:
            if reusable(rec, filters, options):
                out.append(None)
                continue
            try:
                out.append(resolve_path(rec))
            except TileReadError:
                out.append("")
        return out

    if options.jobs <= 1:
        _init_worker(filters, options)
        for batch in _chunks(records, CHUNK):
            yield from _zip(batch, _measure_chunk(paths_of(batch)))
        return
    pool = ProcessPoolExecutor(
        max_workers=options.jobs, initializer=_init_worker, initargs=(filters, options)
    )
    try:
        pending: list[tuple[list[dict], Any]] = []
        for batch in _chunks(records, CHUNK):
            pending.append((batch, pool.submit(_measure_chunk, paths_of(batch))))
            if len(pending) >= 4 * options.jobs:  # bounded: constant memory
                done_batch, fut = pending.pop(0)
                yield from _zip(done_batch, fut.result())
        for done_batch, fut in pending:
            yield from _zip(done_batch, fut.result())
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _zip(batch: list[dict], results: list[tuple[str, Any]]) -> Iterator[tuple[dict, str, Any]]:
    for rec, (status, value) in zip(batch, results, strict=True):
        if status == "reuse":
            status = "ok"
            value = {k: v for k, v in rec["quality"].items() if k not in DECISION_KEYS}
        elif status != "ok" and not rec.get("path"):
            value = "record has no tile 'path'"
        yield rec, status, value


def screen(
    records: Iterable[dict],
    options: FilterOptions,
    report: Any,
    filters: list[QualityFilter],
    labels: dict[str, bool] | None = None,
) -> Iterator[dict]:
    """Add ``quality`` to every record; bad tiles are reported and yielded marked."""
    from sarkit.quality.knn import feature_vector, knn_scores

    active = [f for f in filters if f.name not in options.disabled]
    extra = tuple(name for f in active for name in f.knn_features)
    state = _Pass1()
    with tempfile.TemporaryDirectory(prefix="sarkit-filter-") as tmp:
        spill_path = os.path.join(tmp, "records.jsonl")
        with open(spill_path, "w", encoding="utf-8") as spill:
            for rec, status, value in log.track(
                _measured(records, active, options), "filter: measuring tiles"
            ):
                rid = rec.get("id")
                if status != "ok":
                    report.error(f"{rid}: {value}")
                    rec["quality"] = {"keep": False, "reason": status, "score": 0.0}
                    spill.write(json.dumps({"row": -1, "record": rec}) + "\n")
                    continue
                quality = value
                reason = None
                clear = True
                seed = False
                for flt in active:
                    verdict = flt.verdict(quality, options)
                    if verdict == FAIL:
                        reason, seed = flt.name, bool(getattr(flt, "drop_seeds", True))
                        break
                    clear = clear and verdict == PASS
                row = state.n
                vector = feature_vector(quality, extra)
                state.width = len(vector)
                state.values.extend(vector)
                state.n += 1
                state.fail_reason.append(reason)
                state.fail_seed.append(seed)
                state.clear_pass.append(clear)
                if labels is not None and rid in labels:
                    state.seed_rows[rid] = row
                rec["quality"] = quality
                spill.write(json.dumps({"row": row, "record": rec}) + "\n")
        decision = _decide(state, options, labels, report, knn_scores)
        with open(spill_path, encoding="utf-8") as spill:
            for line in spill:
                item = json.loads(line)
                rec, row = item["record"], item["row"]
                if row >= 0:
                    score, keep, reason = decision[row]
                    rec["quality"].update(score=round(score, 4), keep=keep, reason=reason)
                yield rec


def _decide(
    state: _Pass1,
    options: FilterOptions,
    labels: dict[str, bool] | None,
    report: Any,
    knn_scores: Any,
) -> list[tuple[float, bool, str | None]]:
    n = state.n
    if labels is not None:
        unknown = sorted(set(labels) - set(state.seed_rows))
        if unknown:
            shown = ", ".join(unknown[:10]) + (
                f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            )
            raise SarkitError(
                f"{options.seed_labels}: seed labels name ids not among the input records: {shown}"
            )
    if n == 0:
        return []
    failed = np.array([r is not None for r in state.fail_reason])
    seed_keep = np.zeros(n, dtype=bool)
    is_seed = failed & np.array(state.fail_seed)
    if labels is not None:
        for rid, row in state.seed_rows.items():
            is_seed[row] = True
            seed_keep[row] = labels[rid]
    else:
        clear = np.array(state.clear_pass) & ~failed
        is_seed |= clear
        seed_keep |= clear
    use_knn = "knn" not in options.disabled
    n_keep, n_drop = int((is_seed & seed_keep).sum()), int((is_seed & ~seed_keep).sum())
    origin = "hand labels + rule failures" if labels else "bootstrapped from the rules"
    report.notes["kNN seeds"] = f"{n_keep} keep / {n_drop} drop ({origin})"
    if use_knn and n_keep and n_drop:
        matrix = np.frombuffer(state.values, dtype=np.float64).reshape(n, state.width)
        seeds = np.flatnonzero(is_seed)
        scores = knn_scores(matrix, seeds, seed_keep[seeds], options.k, fit_rows=~failed)
    else:
        if use_knn:
            report.notes["kNN"] = "skipped: seeds of one kind only; rules decide"
        scores = np.where(failed, 0.0, 1.0)
    label_rows = set(state.seed_rows.values())
    out: list[tuple[float, bool, str | None]] = []
    for i in range(n):
        score = float(scores[i])
        if i in label_rows:  # a hand label overrides every rule for its own tile
            keep = bool(seed_keep[i])
            reason = None if keep else "seed-label"
        elif failed[i]:
            keep, reason = False, state.fail_reason[i]
        elif labels is None and is_seed[i]:
            keep, reason = True, None
        else:
            keep = score >= options.min_score or not use_knn
            reason = None if keep else "knn"
        out.append((score, keep, reason))
    return out


def available_filters() -> list[QualityFilter]:
    """Every registered quality filter, built-ins first (their order is the reason priority)."""
    from sarkit import plugins

    return list(plugins.collect("sarkit_quality_filters").values())


def run(records: Iterable[dict], options: FilterOptions, report: Any) -> Iterator[dict]:
    """The stage as the hook returns it: seed labels are read before any tile is."""
    from sarkit.quality.knn import read_seed_labels

    filters = available_filters()
    known = {f.name for f in filters} | {"knn"}
    unknown = sorted(set(options.disabled) - known)
    if unknown:
        from sarkit.errors import UsageError

        raise UsageError(
            f"--disable: unknown filter {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    labels = read_seed_labels(options.seed_labels) if options.seed_labels else None
    log.debug(f"filter: {len(filters)} filters, {options.jobs} process(es)")
    return screen(records, options, report, filters, labels)
