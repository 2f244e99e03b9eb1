"""`sarkit search`: rank an index by a sentence (or a tile), filter, re-rank, write the hits.

A text query is embedded by the index's own run (its text tower), after the run's identity
is checked against the index; a ``--like`` tile already in the index uses its stored vector
and needs no model. Filters (``--bbox``, ``--sensor``, ``--scale``) make an allowed set
first; the backend then ranks only allowed tiles (a narrow filter is ranked exactly).
``--rerank N`` re-scores the N best by ITM (the retrieval head's re-ranking:
``sarkit.tasks.vl.evaluate.itm_pair_logits``), score = ITM match logit + cosine, as BLIP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sarkit import log
from sarkit.errors import SarkitError, UsageError
from sarkit.report import Report
from sarkit.search.archive import Archive


@dataclass
class SearchOptions:
    """What `sarkit search` was asked."""

    index: Path
    text: str | None = None
    like: str | None = None
    k: int = 50
    run: Path | None = None
    bbox: tuple[float, float, float, float] | None = None
    sensors: list[str] = field(default_factory=list)
    scales: list[str] = field(default_factory=list)
    rerank: int = 0
    exact: bool = False
    batch_size: int = 32


def load_model(archive: Archive, run: Path | None):
    """The index's model (from --run or the folder it was embedded with), identity checked."""
    from sarkit.search.model import SearchModel

    stored = archive.manifest["model"].get("run")
    if run is None:
        if not stored or not Path(stored).is_dir():
            raise SarkitError(
                f"{archive.folder}: its model's run folder {stored} is gone; give --run RUN "
                "(the same model)"
            )
        run = Path(stored)
    from sarkit.search.model import run_sha256

    key = (str(Path(run).resolve()), run_sha256(Path(run)))
    model = _LOADED.get(key)
    if model is None:  # one process asking many queries (a library user, a bench) loads once
        model = SearchModel(Path(run))
        _LOADED.clear()
        _LOADED[key] = model
    archive.check_model(model.identity(), f"--run {run} is not the model of {archive.folder}")
    return model


_LOADED: dict[tuple[str, str], Any] = {}


def allowed_mask(columns: dict[str, np.ndarray], options: SearchOptions) -> np.ndarray | None:
    """(n,) bool of the tiles every filter keeps; None without filters."""
    from sarkit.search.geo import in_bbox

    mask = None

    def narrow(m: np.ndarray) -> None:
        nonlocal mask
        mask = m if mask is None else mask & m

    if options.bbox is not None:
        narrow(in_bbox(columns["rings"], options.bbox))
    for key, wanted in (("sensor", options.sensors), ("scale", options.scales)):
        if wanted:
            values = np.char.lower(columns[key].astype(str))
            narrow(np.isin(values, [w.lower() for w in wanted]))
    return mask


def open_searcher(archive: Archive, vectors: np.ndarray, exact: bool) -> Any:
    from sarkit import plugins

    info = archive.manifest.get("backend") or {"name": "exact", "settings": {}}
    if exact or info.get("count") not in (None, archive.count):
        info = {"name": "exact", "settings": {}}
    backend = plugins.lookup("sarkit_index_backends", info["name"], "index backend")
    return backend.open(vectors, archive.backend_folder(info["name"]), info["settings"])


def like_vector(
    archive: Archive, columns: dict, vectors: np.ndarray, tile: str, options: SearchOptions
):
    """(vector, index of the tile in the index or None, model or None) of ``--like TILE``:
    an id or tile path of the index (its stored vector), else a tile file embedded now."""
    ids = columns["ids"]
    hit = np.flatnonzero(ids == tile)
    if not len(hit):
        resolved = str(Path(tile).resolve()) if Path(tile).exists() else None
        hit = np.flatnonzero(columns["paths"] == resolved) if resolved else hit
    if len(hit):
        return vectors[int(hit[0])], int(hit[0]), None
    if not Path(tile).is_file():
        raise SarkitError(f"--like {tile}: neither an id of {archive.folder} nor a tile file")
    import torch

    model = load_model(archive, options.run)
    tiles = model.tiles([{"id": tile, "path": str(Path(tile).resolve())}], None)
    with torch.inference_mode():
        return model.image_vectors(tiles[0][0][None])[0], None, model


def rerank(
    archive: Archive, columns: dict, model: Any, text: str, idx: np.ndarray, itc: np.ndarray,
    report: Report, batch: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(indices, scores, itm logits) of the re-ranked candidates, best first. A tile that
    cannot be read now is named and counted, and keeps its cosine rank below the others."""
    import torch

    from sarkit.tasks.vl.evaluate import itm_pair_logits

    enc = model.encode_text(text)
    rows = [{"id": str(columns["ids"][g]), "path": str(columns["paths"][g])} for g in idx]
    tiles = model.tiles(rows, None)
    good, images = [], []
    for i in range(len(rows)):
        try:
            images.append(tiles[i][0])
            good.append(i)
        except SarkitError as exc:
            report.error(f"--rerank: {exc}; ranked by cosine only")
    itm = np.full(len(idx), np.nan, np.float32)
    with torch.inference_mode():
        for s in range(0, len(good), batch):
            part = good[s : s + batch]
            tokens = model.image_tokens(torch.stack(images[s : s + batch]))
            zeros = torch.zeros(len(part), dtype=torch.long)
            logits = itm_pair_logits(model.lip, tokens, enc, torch.arange(len(part)), zeros)
            itm[part] = logits.float().numpy()
    score = np.where(np.isnan(itm), -np.inf, itm + itc)
    order = np.lexsort((np.arange(len(idx)), -itc, -score))
    return idx[order], np.where(np.isnan(itm), itc, score)[order], itm[order]


def search(options: SearchOptions, report: Report) -> tuple[list[dict], Archive]:
    """The ranked hits (records with ``score`` and ``rank``) and the index they came from."""
    if (options.text is None) == (options.like is None):
        raise UsageError("give a query TEXT or --like TILE (one of the two)")
    if options.like is not None and options.rerank:
        raise UsageError("--rerank scores text-image pairs: it needs a query TEXT, not --like")
    if options.text is not None and not options.text.strip():
        raise UsageError("the query TEXT is empty")
    archive = Archive.open(options.index)
    columns = archive.columns()
    vectors = archive.vectors()
    model = None
    own = None
    if options.like is not None:
        query, own, model = like_vector(archive, columns, vectors, options.like, options)
    else:
        model = load_model(archive, options.run)
        query = model.text_vector(options.text)
    mask = allowed_mask(columns, options)
    if own is not None and mask is not None:  # more like this tile: itself is no answer
        mask[own] = False
    report.notes["index"] = f"{archive.folder} ({archive.count} tile(s))"
    if mask is not None:
        report.notes["pass the filters"] = int(mask.sum())
    want = max(options.k, options.rerank) + (own is not None and mask is None)
    from sarkit.search.backends import AUTO_MIN, ExactSearcher

    searcher = open_searcher(archive, vectors, options.exact)
    if mask is not None and mask.sum() < AUTO_MIN:
        searcher = ExactSearcher(vectors)  # few candidates: scan them all, exactly
    name = getattr(searcher, "name", "an index")
    report.notes["ranked by"] = "exact scan" if searcher.exact else f"{name} (approximate)"
    scores, idx = searcher.search(query[None].astype(np.float32), want, mask)
    keep = (idx[0] >= 0) & (idx[0] != (-1 if own is None else own))
    scores, idx = scores[0][keep].astype(np.float64), idx[0][keep]
    itm = None
    if options.rerank and len(idx):
        n = min(options.rerank, len(idx))
        head_idx, head_score, itm = rerank(
            archive, columns, model, options.text, idx[:n], scores[:n], report,
            options.batch_size,
        )  # fmt: skip
        cos = dict(zip(idx.tolist(), scores.tolist(), strict=True))
        idx = np.concatenate([head_idx, idx[n:]])  # the rest keep their cosine order
        scores = np.concatenate([head_score, scores[n:]])
        report.notes["re-ranked by ITM"] = n
    idx, scores = idx[: options.k], scores[: options.k]
    records = archive.records(columns, idx.tolist())
    hits = []
    for rank, (g, rec, score) in enumerate(zip(idx, records, scores, strict=True), start=1):
        hit = {**rec, "score": round(float(score), 6), "rank": rank}
        if itm is not None:
            hit["itc"] = round(float(cos[int(g)]), 6)
            if rank - 1 < len(itm) and np.isfinite(itm[rank - 1]):
                hit["itm"] = round(float(itm[rank - 1]), 6)
        hits.append(hit)
    if not hits:
        log.warn("no tile matches the query and its filters")
    return hits, archive
