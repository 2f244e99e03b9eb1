"""The multi-scale caption chain (HCoT-MIS): parents first, independent tiles concurrently.

T_L = f(S_L), T_M = f(S_M, T_L), T_S = f(S_S, T_M): a tile is captioned once its parent's
text is known; a tile whose parent failed is captioned without context and says so. Every
finished tile is journaled (fsync) before it is written out, so a rerun with the same
journal skips it; records are written in input order.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sarkit import log
from sarkit.caption import CaptionOptions
from sarkit.caption.journal import Journal, entry_key
from sarkit.caption.parsing import extract, problem
from sarkit.caption.templates import TASKS, TaskSpec, Templates, find_prompts
from sarkit.errors import SarkitError
from sarkit.llm.base import Answer, BackendError, BackendFatal, Model, Request
from sarkit.raster.tileread import TileReadError
from sarkit.records import Located
from sarkit.report import Report

AUTO_SIDE = 384  #: --task auto reads the tile at most this many pixels a side
STAGES = {"L": "L", "M": "M", "S": "S", "XS": "S", "XXS": "S"}
_PENDING = object()


def scale_stage(record: dict, parent_stage: str | None) -> str:
    """L, M or S: from the record's scale name, else from its depth in the parent chain."""
    scale = str(record.get("scale") or "").strip()
    if scale.upper() in STAGES:
        return STAGES[scale.upper()]
    for word, stage in (("large", "L"), ("medium", "M"), ("small", "S")):
        if scale.lower().startswith(word):
            return stage
    if parent_stage is None:
        return "L"
    return "M" if parent_stage == "L" else "S"


def choose_task(record: dict, path: str, wanted: str) -> tuple[str, str]:
    """The task family for one tile, and why (said in the record for --task auto)."""
    if wanted != "auto":
        return wanted, "--task"
    if record.get("task") in TASKS:
        return record["task"], "the record's task"
    from sarkit.llm.image import read_gray
    from sarkit.llm.sarstats import analyse

    gray, factor = read_gray(path, AUTO_SIDE)  # a quick look: a coarser grid than offline's
    stats = analyse(gray, float(record.get("pixel_m") or 1.0) * factor)
    look = f"quick look at {max(gray.shape)} px: "
    vessels, land = len(stats.water_targets), len(stats.land_targets)
    if stats.water_frac >= 0.85 or (stats.water_frac >= 0.5 and vessels):
        return (
            "marine",
            f"{look}water covers {100 * stats.water_frac:.0f}%, {vessels} vessel-like targets",
        )
    small = stats.ground_m <= 200 and land >= 1  # a target chip
    if (small or (stats.ground_m <= 500 and land >= 3 and stats.relief < 0.3)) and (
        stats.built_frac < 0.2
    ):
        return "ground", f"{look}{land} discrete targets on land in {stats.ground_m:.0f} m"
    return "terrain", (
        f"{look}water {100 * stats.water_frac:.0f}%, built-up "
        f"{100 * stats.built_frac:.0f}%, {land} targets on land"
    )


class Budget:
    """--max-cost: reserve a request's worst case before sending it; stop when it won't fit."""

    def __init__(self, limit: float | None):
        self.limit = limit
        self.spent = 0.0
        self.reserved = 0.0
        self.exhausted = False
        self._lock = threading.Lock()

    def reserve(self, estimate: float) -> bool:
        with self._lock:
            if self.limit is not None and self.spent + self.reserved + estimate > self.limit:
                self.exhausted = True
                return False
            self.reserved += estimate
            return True

    def settle(self, estimate: float, actual: float) -> None:
        with self._lock:
            self.reserved -= estimate
            self.spent += actual


@dataclass
class Job:
    index: int
    record: dict
    path: str
    parent: dict | None = None  #: the parent's finished record (with texts)
    parent_note: str | None = None  #: why there is no parent context
    parent_stage: str | None = None


@dataclass
class Outcome:
    status: str  #: done, failed, budget, interrupted
    record: dict | None = None
    reason: str = ""
    resumed: bool = False
    stage: str = "L"
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    retries: int = 0
    extra: dict = field(default_factory=dict)


class Captioner:
    def __init__(
        self,
        options: CaptionOptions,
        templates: Templates,
        model: Model,
        client: Any,
        journal: Journal | None,
    ):
        self.options = options
        self.templates = templates
        self.model = model
        self.client = client
        self.journal = journal
        self.budget = Budget(options.max_cost)

    def prepare(self, job: Job) -> tuple[str, str, TaskSpec, str, Any]:
        stage = scale_stage(job.record, job.parent_stage)
        task_name, why = choose_task(job.record, job.path, self.options.task)
        task = self.templates.task(task_name)
        prompt = self.templates.build(job.record, task, stage, job.parent, job.parent_note)
        return stage, why, task, task_name, prompt

    def run(self, job: Job) -> Outcome:
        rid = str(job.record["id"])
        try:
            stage, why, task, task_name, prompt = self.prepare(job)
        except Exception as exc:  # an unreadable tile fails alone; a bad template stops all
            if isinstance(exc, SarkitError) and not isinstance(exc, TileReadError):
                raise
            reason = f"cannot read tile {job.path}: {exc}"
            caption = {"backend": self.model.backend, "model": self.model.sent_id, "failed": reason}
            if job.parent_note:
                caption["context_note"] = f"captioned without context: {job.parent_note}"
            return Outcome(
                "failed",
                dict(job.record, caption=caption),
                reason=reason,
                stage=scale_stage(job.record, job.parent_stage),
            )
        key = entry_key(rid, self.model.backend, self.model.sent_id, prompt.sha256)
        if self.journal is not None and (entry := self.journal.get(key)):
            out = dict(job.record, texts=entry["texts"], caption=entry["caption"])
            return Outcome("done", out, resumed=True, stage=stage)
        if self.options.stop_event.is_set():
            return Outcome("interrupted", stage=stage)
        request = Request(
            job.record,
            task,
            prompt.system,
            prompt.user,
            job.path,
            self.options.image_size,
            job.parent,
            stage,
        )
        est_in, est_out = _estimate(self.client, request)
        estimate = self.model.cost(est_in, est_out)
        t0 = time.monotonic()
        tin = tout = attempts = 0
        answers: list[Answer] = []
        fields: dict[str, str] = {}
        trouble: str | None = "not asked"
        try:
            for round_ in range(2):  # the answer, then at most one repair request
                if not self.budget.reserve(estimate):
                    if round_ == 0:
                        return Outcome("budget", stage=stage)
                    trouble = f"{trouble}; no budget left for a repair request"
                    break
                actual = 0.0
                try:
                    repair = None
                    if answers:
                        previous = answers[-1].text or json.dumps(answers[-1].fields or {})
                        repair = (previous, self.templates.repair_text(task, trouble or ""))
                    answer = self.client.complete(request, repair)
                    answers.append(answer)
                    tin += answer.tokens_in
                    tout += answer.tokens_out
                    attempts += answer.attempts
                    actual = self.model.cost(answer.tokens_in, answer.tokens_out)
                finally:
                    self.budget.settle(estimate, actual)
                got = extract(answer.text, task, answer.fields)
                fields.update(got)
                trouble = problem(fields, task)
                if trouble is None:
                    break
        except BackendFatal:
            raise
        except BackendError as exc:
            if str(exc) == "interrupted":
                return Outcome("interrupted", stage=stage)
            trouble = f"request failed: {exc}"
        except Exception as exc:  # one tile's surprise must not stop the others
            trouble = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, OSError) or "rasterio" in type(exc).__module__:
                trouble = f"cannot read tile {job.path}: {exc}"
        cost = self.model.cost(tin, tout)
        caption = {
            "backend": self.model.backend,
            "model": self.model.sent_id,
            "prompt_sha256": prompt.sha256,
            "tokens_in": tin,
            "tokens_out": tout,
            "latency_s": round(time.monotonic() - t0, 3),
            "cost": round(cost, 6),
            "task": task_name,
            "task_reason": why,
            "scale_stage": stage,
            "context": job.record.get("parent") if job.parent else None,
            "attempts": attempts,
            "repaired": len(answers) > 1,
        }
        if job.parent_note:
            caption["context_note"] = f"captioned without context: {job.parent_note}"
        if answers and "layers" in answers[-1].extra:
            caption["layers"] = answers[-1].extra["layers"]
        status = "done"
        texts: dict[str, str] | None = None
        if trouble is None:
            texts = {n: fields[n] for n in task.field_names}
        else:
            status = "failed"
            if len(answers) == 2 and trouble.startswith("missing"):
                trouble = f"answer unusable after one repair request: {trouble}"
            caption["failed"] = trouble
            texts = None
        out = dict(job.record)
        if texts is not None:
            out["texts"] = texts
        out["caption"] = caption
        if self.journal is not None:
            entry = {
                "key": key,
                "id": rid,
                "status": status,
                "time": time.time(),
                "caption": caption,
            }
            if texts is not None:
                entry["texts"] = texts
            self.journal.append(entry)
        return Outcome(
            status,
            out,
            reason=trouble or "",
            stage=stage,
            tokens_in=tin,
            tokens_out=tout,
            cost=cost,
            retries=max(0, attempts - len(answers)),
        )


def _estimate(client: Any, request: Request) -> tuple[int, int]:
    estimate = getattr(client, "estimate", None)
    return estimate(request) if estimate else (0, 0)


def _resolve_path(record: dict, dirs: list[str]) -> str:
    path = Path(str(record.get("path", "")))
    if not path.is_absolute() and not path.exists():
        for folder in dirs:
            if (Path(folder) / path).exists():
                return str(Path(folder) / path)
    return str(path)


def dropped_by_filter(record: dict) -> bool:
    """A record `filter --mark` rejected: passed through uncaptioned (no money spent on it)."""
    quality = record.get("quality")
    return isinstance(quality, dict) and quality.get("keep") is False


def _gather(
    items: Iterable[Any], report: Report, limit: int | None, dirs: list[str]
) -> list[tuple[dict, str]]:
    """The records in input order; --limit counts only those to caption."""
    seen: set[str] = set()
    out: list[tuple[dict, str]] = []
    wanted = 0
    for n, item in enumerate(items, start=1):
        record = item.record if isinstance(item, Located) else item
        rid = record.get("id")
        if not isinstance(rid, str) or not rid:
            report.error(f"record {n}: no string 'id'")
            continue
        if "path" not in record:
            report.error(f"{rid}: record is missing key 'path'")
            continue
        if rid in seen:
            report.error(f"{rid}: duplicate tile id, skipped")
            continue
        seen.add(rid)
        out.append((record, _resolve_path(record, dirs)))
        if dropped_by_filter(record):
            report.skip("dropped by filter")
            continue
        wanted += 1
        if limit is not None and wanted >= limit:
            break
    return out


def caption_records(
    items: Iterable[Any], options: CaptionOptions, report: Report
) -> Iterator[dict]:
    """The built-in stage: resolve the model, read the prompts, run the chain."""
    from sarkit.llm.registry import resolve

    backend, model = resolve(options.llm)
    if options.model_id:
        model = Model(**{**model.__dict__, "model_id": options.model_id})
    templates = Templates(find_prompts(options.prompts))
    if options.task != "auto":
        templates.task(options.task)
    # a dry run shows the first --limit prompts but prices the whole input
    limit = None if options.dry_run else options.limit
    records = _gather(items, report, limit, list(options.record_dirs))
    try:
        client = backend.connect(model, options)
    except BackendFatal as exc:
        raise SarkitError(str(exc)) from None
    try:
        if options.dry_run:
            dry_run(records, options, templates, model, client, report)
            return
        journal = Journal(options.journal) if options.journal else None
        try:
            yield from _run(records, Captioner(options, templates, model, client, journal), report)
        finally:
            if journal is not None:
                journal.close()
    finally:
        client.close()


def dry_run(records, options, templates, model, client, report) -> None:
    """Show the exact prompts of the first tiles and estimate what the whole run costs."""
    shown = options.limit or 1
    total_in = total_out = 0
    stages: dict[str, str] = {}
    ids = {r["id"] for r, _ in records}
    records = [(r, p) for r, p in records if not dropped_by_filter(r)]
    for n, (record, path) in enumerate(records):
        pid = record.get("parent")
        stage = scale_stage(record, stages.get(pid) if pid else None)
        stages[record["id"]] = stage
        task_name, why = choose_task(record, path, options.task)
        task = templates.task(task_name)
        parent = None
        note = None
        if pid and pid in ids:
            parent = {
                "scale": "larger",
                "texts": {
                    "(text of the parent tile)": f"[{pid}'s "
                    "caption: written when that tile is captioned]"
                },
            }
        elif pid:
            note = f"parent {pid} is not in this input"
        prompt = templates.build(record, task, stage, parent, note)
        request = Request(
            record, task, prompt.system, prompt.user, path, options.image_size, parent, stage
        )
        tin, tout = _estimate(client, request)
        total_in += tin
        total_out += tout
        if n < shown:
            log.console.print(
                f"=== {record['id']}: task {task_name} ({why}), stage {stage}, "
                f"prompt sha256 {prompt.sha256}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            log.console.print("[bold]system[/bold]")
            log.console.print(prompt.system, markup=False, highlight=False, soft_wrap=True)
            log.console.print("[bold]user[/bold]")
            log.console.print(prompt.user, markup=False, highlight=False, soft_wrap=True)
            if model.backend != "offline":
                log.console.print(
                    f"[image: the tile {path} as a PNG data URL, at most "
                    f"{options.image_size} pixels a side]",
                    markup=False,
                    soft_wrap=True,
                )
    cost = model.cost(total_in, total_out)
    report.notes["tiles"] = len(records)
    report.notes["estimated tokens in"] = total_in
    report.notes["most tokens out"] = total_out
    report.notes["estimated cost (USD, at most)"] = f"{cost:.4f}"
    log.info(
        f"dry run: {len(records)} tiles with {model.name} would cost at most "
        f"${cost:.4f} (about {total_in} tokens in, at most {total_out} out); nothing sent"
    )


def _run(records: list[tuple[dict, str]], cap: Captioner, report: Report) -> Iterator[dict]:
    options = cap.options
    n = len(records)
    index = {r["id"]: i for i, (r, _) in enumerate(records)}
    children: dict[int, list[int]] = collections.defaultdict(list)
    ready: collections.deque[Job] = collections.deque()
    results: list[Any] = [_PENDING] * n
    dropped = {i for i, (record, _) in enumerate(records) if dropped_by_filter(record)}
    for i, (record, path) in enumerate(records):
        pid = record.get("parent")
        if i in dropped:
            results[i] = record  # passed through as it came
        elif pid and pid in index and index[pid] not in dropped:
            children[index[pid]].append(i)
        else:
            note = None
            if pid:
                note = (
                    f"parent {pid} was dropped by filter"
                    if pid in index
                    else f"parent {pid} is not in this input"
                )
            ready.append(Job(i, record, path, parent_note=note))
    reachable = {job.index for job in ready} | dropped
    stack = list(reachable)
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in reachable:
                reachable.add(c)
                stack.append(c)
    for i in sorted(set(range(n)) - reachable):  # parent links that loop: bad input
        results[i] = None
        report.error(f"{records[i][0]['id']}: its parent links form a cycle; skipped")
    stages: dict[int, str] = {}
    totals = collections.Counter()
    next_out = 0
    workers = max(1, options.concurrency) + int(getattr(cap.client, "prefetch", 0))
    pool = DaemonPool(workers)
    inflight: dict[cf.Future, Job] = {}
    stopping = False
    fatal: BaseException | None = None

    def finish(job: Job, outcome: Outcome) -> None:
        i = job.index
        stages[i] = outcome.stage
        rid = job.record["id"]
        if outcome.status in ("budget", "interrupted"):
            results[i] = None
            totals["not captioned: " + outcome.status] += 1 + _descendants(children, i)
            _drop(children, i, results)
            return
        results[i] = outcome.record
        totals["tokens_in"] += outcome.tokens_in
        totals["tokens_out"] += outcome.tokens_out
        totals["cost"] += outcome.cost
        totals["retries"] += outcome.retries
        if outcome.status == "done":
            report.ok()
            if outcome.resumed:
                totals["from journal"] += 1
            for c in children[i]:
                ready.appendleft(
                    Job(
                        c,
                        records[c][0],
                        records[c][1],
                        parent=outcome.record,
                        parent_stage=outcome.stage,
                    )
                )
        else:
            report.error(f"{rid}: caption failed: {outcome.reason}")
            for c in children[i]:
                ready.appendleft(
                    Job(
                        c,
                        records[c][0],
                        records[c][1],
                        parent_stage=outcome.stage,
                        parent_note=f"parent {rid} failed to caption",
                    )
                )

    try:
        with log.progress(f"caption ({cap.model.name})", total=n - len(dropped)) as advance:
            while ready or inflight:
                while ready and len(inflight) < 2 * workers and not stopping:
                    job = ready.popleft()
                    job.parent_stage = job.parent_stage or (
                        stages.get(index[job.record["parent"]])
                        if job.record.get("parent") in index
                        else None
                    )
                    inflight[pool.submit(cap.run, job)] = job
                if not inflight:
                    break
                done, _ = cf.wait(inflight, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    job = inflight.pop(fut)
                    try:
                        outcome = fut.result()
                    except (BackendFatal, SarkitError) as exc:
                        fatal = exc
                        outcome = Outcome("interrupted")
                    except Exception as exc:  # a bug on one tile: report it, keep the rest
                        reason = f"internal error: {type(exc).__name__}: {exc}"
                        outcome = Outcome(
                            "failed", dict(job.record, caption={"failed": reason}), reason=reason
                        )
                    finish(job, outcome)
                    advance(1)
                    if cap.budget.exhausted or fatal is not None:
                        stopping = True
                    if fatal is not None:
                        options.stop_event.set()
                if stopping and not inflight:
                    for job in ready:
                        results[job.index] = None
                        totals["not captioned: budget"] += 1 + _descendants(children, job.index)
                        _drop(children, job.index, results)
                    ready.clear()
                while next_out < n and results[next_out] is not _PENDING:
                    if results[next_out] is not None:
                        yield results[next_out]
                    next_out += 1
            # records passed through with nothing to caption after them
            for result in results[next_out:]:
                if result is not None and result is not _PENDING:
                    yield result
    except (KeyboardInterrupt, GeneratorExit):
        # Ctrl-C, or the reader went away: stop at once; requests in flight are abandoned
        # (daemon threads) and never journaled. The command says how to resume.
        options.stop_event.set()
        pool.shutdown(wait=False)
        raise
    finally:
        pool.shutdown(wait=not options.stop_event.is_set())
    if fatal is not None:
        where = (
            f"finished tiles are kept in the journal {cap.journal.path}; rerun the same "
            "command to resume"
            if cap.journal is not None
            else "nothing was kept: add --journal FILE to make a run resumable"
        )
        raise SarkitError(
            f"{fatal}; stopped after {report.done} captioned tiles: {where}"
        ) from None
    for key in ("from journal", "retries"):
        if totals[key]:
            report.notes[key] = totals[key]
    report.notes["tokens in / out"] = f"{totals['tokens_in']} / {totals['tokens_out']}"
    report.notes["cost (USD)"] = f"{totals['cost']:.4f}"
    for key, value in totals.items():
        if key.startswith("not captioned") and value:
            report.skip(key, value)
    if totals["not captioned: budget"]:
        journal = cap.journal
        report.error(
            f"--max-cost {options.max_cost:g} reached after ${cap.budget.spent:.4f}: "
            f"{totals['not captioned: budget']} tiles not captioned; "
            + (
                f"rerun with --journal {journal.path} and a higher --max-cost to continue"
                if journal
                else "rerun with a higher --max-cost (and --journal to keep work)"
            )
        )


class DaemonPool:
    """A thread pool whose threads never hold the process: after Ctrl-C the run exits at once.

    (concurrent.futures joins its worker threads at exit, which would wait for every request
    in flight, up to the timeout.) Futures are ordinary `concurrent.futures.Future`s.
    """

    def __init__(self, n: int):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._loop, name=f"caption-{i}", daemon=True) for i in range(n)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Any, *args: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        self._queue.put((future, fn, args))
        return future

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller through the future
                future.set_exception(exc)

    def shutdown(self, wait: bool = True) -> None:
        while True:  # cancel what has not started
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


def _descendants(children: dict[int, list[int]], i: int) -> int:
    return sum(1 + _descendants(children, c) for c in children.get(i, []))


def _drop(children: dict[int, list[int]], i: int, results: list[Any]) -> None:
    for c in children.get(i, []):
        results[c] = None
        _drop(children, c, results)
