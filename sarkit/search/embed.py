"""`sarkit embed`: every tile record through the run's vision tower, into an index folder.

Records stream from the input (no whole-archive list in memory); tiles are read and
preprocessed by ``-j`` threads (the readers release the GIL) while the model embeds the
previous batch. Vectors are flushed as a chunk every ``chunk`` tiles or 30 seconds, so a
kill -9 loses at most the tiles since the last flush, and a rerun skips every id already in
the index (the same command resumes; a longer record file adds only its new tiles).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sarkit import log
from sarkit.errors import SarkitError
from sarkit.records import Located, read_records
from sarkit.report import Report
from sarkit.stage import unique_ids, with_tile_paths

FLUSH_SECONDS = 30.0


@dataclass
class EmbedOptions:
    """What `sarkit embed` was asked (also what a plugin's ``sarkit_embed`` would read)."""

    inputs: list[str]
    output: Path
    run: Path
    batch_size: int = 32
    workers: int = 2
    chunk: int = 1024
    backend: str = "auto"


def count_lines(sources: Iterable[str]) -> int | None:
    """Non-blank lines of the input files (the progress total); None for stdin."""
    total = 0
    for s in sources:
        if s == "-":
            return None
        try:
            with open(s, "rb") as fh:
                total += sum(1 for line in fh if line.strip())
        except OSError:
            continue
    return total


def _ordered_map(fn, items: Iterable, workers: int, ahead: int) -> Iterator:
    """fn over items in order, `workers` threads, at most `ahead` items in flight."""
    if workers <= 0:
        for item in items:
            yield item, fn(item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embed-read") as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= ahead:
                it, fut = pending.popleft()
                yield it, fut.result()
        while pending:
            it, fut = pending.popleft()
            yield it, fut.result()


def embed(options: EmbedOptions, report: Report) -> Path:
    """Embed the new records of ``options.inputs`` into ``options.output``; the index folder."""
    from sarkit import plugins
    from sarkit.search.archive import Archive
    from sarkit.search.model import SearchModel

    backend = None
    if options.backend != "auto":
        backend = plugins.lookup("sarkit_index_backends", options.backend, "index backend")
    model = SearchModel(options.run)
    archive = Archive.create_or_resume(options.output, model.identity(), model.dim)
    known = archive.ids()
    if known:
        log.info(f"{options.output}: {len(known)} tile(s) already embedded; adding the rest")
    total = count_lines(options.inputs)
    base_of: dict[str, Path | None] = {}

    def fresh(items: Iterable[Located]) -> Iterator[Located]:
        for item in items:
            if item.id in known:
                report.skip("already in the index")
                continue
            yield item

    def load(item: Located):
        if item.source not in base_of:
            base_of[item.source] = None if item.source == "<stdin>" else Path(item.source).parent
        tiles = model.tiles([item.record], base_of[item.source])
        try:
            image = tiles[0][0]
        except SarkitError as exc:
            return exc
        from sarkit.train.data import resolve_path

        return image, str(resolve_path(str(item.record["path"]), tiles.base).resolve())

    items = read_records(options.inputs, report, required=("id", "path"))
    stream = fresh(with_tile_paths(unique_ids(items, report), report))
    loaded = _ordered_map(load, stream, options.workers, max(2, 2 * options.batch_size))
    buf_vec: list[np.ndarray] = []
    buf_rec: list[dict] = []
    buf_path: list[str] = []
    last_flush = time.monotonic()
    embedded = 0

    def flush() -> None:
        nonlocal last_flush
        if buf_rec:
            archive.append(np.concatenate(buf_vec), buf_rec, buf_path)
            buf_vec.clear()
            buf_rec.clear()
            buf_path.clear()
        last_flush = time.monotonic()

    started = time.monotonic()
    with log.progress("embed", total) as advance, torch.inference_mode():
        batch: list[tuple[Located, torch.Tensor, str]] = []

        def run_batch() -> None:
            nonlocal embedded
            if not batch:
                return
            vectors = model.image_vectors(torch.stack([b[1] for b in batch]))
            buf_vec.append(vectors)
            buf_rec.extend(b[0].record for b in batch)
            buf_path.extend(b[2] for b in batch)
            embedded += len(batch)
            report.ok(len(batch))
            advance(len(batch), status=f"{embedded / (time.monotonic() - started):.1f} tiles/s")
            batch.clear()
            if len(buf_rec) >= options.chunk or time.monotonic() - last_flush > FLUSH_SECONDS:
                flush()

        for item, result in loaded:
            if isinstance(result, SarkitError):
                report.error(str(item.error(f"{result}; skipped")))
                advance(1)
                continue
            batch.append((item, result[0], result[1]))
            if len(batch) >= options.batch_size:
                run_batch()
        run_batch()
        flush()
    seconds = time.monotonic() - started
    report.notes["index"] = f"{options.output} ({archive.count} tile(s))"
    if embedded:
        report.notes["tiles/s"] = f"{embedded / max(seconds, 1e-9):.1f}"
    build_backend(archive, backend)
    report.notes["backend"] = archive.manifest.get("backend", {}).get("name", "exact")
    return Path(options.output)


def build_backend(archive, backend=None) -> None:
    """Build the index structure: `backend`, or by size (FAISS IVF-PQ from ``AUTO_MIN``)."""
    from sarkit import plugins
    from sarkit.search.backends import AUTO_BACKEND, AUTO_MIN

    current = archive.manifest.get("backend")
    if backend is None:
        name = AUTO_BACKEND if archive.count >= AUTO_MIN else "exact"
        backend = plugins.lookup("sarkit_index_backends", name, "index backend")
    if current and current.get("name") == backend.name and current.get("count") == archive.count:
        return
    if archive.count == 0:
        return
    if backend.name != "exact":
        log.info(f"building the {backend.name} index over {archive.count} vector(s)")
    settings = backend.build(archive.vectors(), archive.backend_folder(backend.name))
    archive.set_backend(backend.name, settings)
