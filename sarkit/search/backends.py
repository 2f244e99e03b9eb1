"""The built-in index backends: an exact numpy scan and a FAISS inverted-file index.

Both are ``sarkit_index_backends`` plugins (``sarkit.search.plugin``). Vectors are unit
length, so inner product = cosine similarity. ``build`` runs once at the end of `sarkit
embed` and writes only numpy files; ``open`` makes a searcher at query time.

Where one switches to the other (bench/search.py, docs/results.md, measured on the shared
2-core machine at load averages of 9-14): an exact scan of 10k vectors (10 MB at d = 256,
in the CPU cache) took 1.5 ms a query, of 20k 19 ms, of 100k 50-100 ms, of 1M 1.5 s; the
IVF answered in under 0.1 ms up to 100k (recall@10 >= 0.96) and in 104 ms at 1M (recall
0.97), but must be trained first (k-means at embed time: 5 s at 20k, 8 min at 1M) and is
approximate. ``AUTO_MIN`` vectors is where `--backend auto` builds the IVF.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sarkit.errors import SarkitError

AUTO_MIN = 20_000  # vectors from which --backend auto builds the FAISS index (measured)
CALIBRATION_QUERIES = 256
TARGET_RECALL = 0.95  # nprobe is raised until calibration queries reach it


_CONTROLLER = None


@contextlib.contextmanager
def few_threads(queries: int) -> Iterator[None]:
    """One BLAS / OpenMP thread for a few queries. A single query is a memory-bound scan:
    on this 2-core machine under load a 2-thread OpenBLAS gemv took 2.5-15 ms where one
    thread takes 0.3 ms (10k x 256), and FAISS's OpenMP search slowed the same way."""
    global _CONTROLLER
    if queries >= 16:
        yield
        return
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    faiss = sys.modules.get("faiss")
    before = faiss.omp_get_max_threads() if faiss else None
    if faiss:
        faiss.omp_set_num_threads(1)
    try:
        with _CONTROLLER.limit(limits=1, user_api="blas"):
            yield
    finally:
        if faiss:
            faiss.omp_set_num_threads(before)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices) of each row's k best, best first; ties by lower index."""
    n = scores.shape[1]
    k = min(k, n)
    if k <= 0:
        return np.zeros((len(scores), 0), np.float32), np.zeros((len(scores), 0), np.int64)
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), scores.shape).copy()
    picked = np.take_along_axis(scores, part, 1)
    order = np.lexsort((part, -picked), axis=1)
    idx = np.take_along_axis(part, order, 1)
    return np.take_along_axis(scores, idx, 1), idx.astype(np.int64)


class ExactSearcher:
    """Every stored vector scored (a matrix product), optionally only the allowed ones."""

    exact = True

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        with few_threads(len(queries)):
            if allowed is None:
                return top_k(queries @ self.vectors.T, k)
            where = np.flatnonzero(allowed)
            scores, idx = top_k(queries @ self.vectors[where].T, k)
            return scores, where[idx]


class ExactBackend:
    """No structure: a scan of every vector, exact (the right choice for small archives)."""

    name = "exact"
    summary = "numpy scan of every vector (exact)"

    def build(self, vectors: np.ndarray, folder: Path) -> dict:
        return {}

    def open(self, vectors: np.ndarray, folder: Path, settings: dict) -> ExactSearcher:
        return ExactSearcher(vectors)


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # a dependency of sarkit: only a broken install lacks it
        raise SarkitError(f"the faiss-ivf backend needs faiss-cpu ({exc})") from None
    return faiss


def n_lists(n: int) -> int:
    """IVF lists: about 2 sqrt(n) (k-means on 2 cores stays near a minute at 1M vectors),
    with at least 39 training vectors per list (FAISS's minimum for a stable k-means)."""
    return int(max(1, min(round(2 * np.sqrt(n)), n // 39)))


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return top_k(queries @ vectors.T, k)[1]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true top k found (-1 entries never match)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


class IVFSearcher:
    """A FAISS IndexIVFFlat (inner product) over the vectors; filters through an ID
    selector."""

    exact = False

    def __init__(self, index: Any, vectors: np.ndarray, nprobe: int):
        self.index, self.vectors, self.nprobe = index, vectors, int(nprobe)
        index.nprobe = self.nprobe

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self.vectors))
        with few_threads(len(q)):
            if allowed is None:
                scores, idx = self.index.search(q, k)
            else:
                ids = np.flatnonzero(allowed).astype(np.int64)
                sel = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
                params = faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
                scores, idx = self.index.search(q, k, params=params)
        return scores, idx.astype(np.int64)  # -1: fewer than k found (a narrow filter)


class IVFBackend:
    """FAISS IndexIVFFlat: k-means lists, a query scans the nprobe nearest lists.

    Stored as numpy files only: ``centroids.npy`` (lists x d) and ``assign.npy`` (the list
    of every vector), so opening re-adds the vectors to their lists without the k-means or
    the assignment (``faiss.contrib.ivf_tools.add_preassigned``). ``nprobe`` is the
    smallest power of two at which calibration queries (midpoints of random pairs of stored
    vectors) find ``TARGET_RECALL`` of their exact top 10.
    """

    name = "faiss-ivf"
    summary = "FAISS IndexIVFFlat, nprobe calibrated to recall@10 >= 0.95 (approximate)"

    def build(self, vectors: np.ndarray, folder: Path, seed: int = 0) -> dict:
        from sarkit.atomic import atomic_path

        faiss = _faiss()
        n, d = vectors.shape
        if n == 0:
            raise SarkitError("the faiss-ivf backend needs at least one vector")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        nlist = n_lists(n)
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))]
        kmeans = faiss.Kmeans(d, nlist, niter=15, seed=seed, spherical=True, verbose=False)
        kmeans.train(sample)
        centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(centroids)
        assign = np.empty(n, np.int64)
        for s in range(0, n, 65536):
            assign[s : s + 65536] = quantizer.search(x[s : s + 65536], 1)[1][:, 0]
        index = self._index(centroids, x, assign)
        nprobe = self._calibrate(index, x, nlist, rng)
        folder.mkdir(parents=True, exist_ok=True)
        for name, arr in (("centroids.npy", centroids), ("assign.npy", assign)):
            with atomic_path(folder / name) as tmp, open(tmp, "wb") as fh:
                np.save(fh, arr)
        return {"nlist": nlist, "nprobe": nprobe, "target_recall": TARGET_RECALL}

    def _index(self, centroids: np.ndarray, x: np.ndarray, assign: np.ndarray) -> Any:
        faiss = _faiss()
        from faiss.contrib.ivf_tools import add_preassigned

        d = centroids.shape[1]
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(centroids)
        index = faiss.IndexIVFFlat(quantizer, d, len(centroids), faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
        add_preassigned(index, x, np.ascontiguousarray(assign, dtype=np.int64))
        return index

    def _calibrate(self, index: Any, x: np.ndarray, nlist: int, rng: np.random.Generator) -> int:
        n, d = x.shape
        m = min(CALIBRATION_QUERIES, n)
        # stored vectors moved off themselves (cosine ~0.7 to where they came from): a
        # query near the data but on none of it, as a text query is (bench/search.py
        # measures the recall of other queries)
        q = x[rng.choice(n, m, replace=False)]
        q = q + rng.standard_normal(q.shape).astype(np.float32) / np.sqrt(d)
        q = (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        k = min(10, n)
        truth = exact_top(x, q, k)
        nprobe = 1
        while nprobe < nlist:
            index.nprobe = nprobe
            if recall_at(index.search(q, k)[1], truth) >= TARGET_RECALL:
                break
            nprobe = max(nprobe + 1, round(nprobe * 1.5))
        nprobe = min(nprobe, nlist)
        if nprobe > nlist // 4:
            from sarkit import log

            log.warn(
                f"faiss-ivf: recall@10 {TARGET_RECALL} needs {nprobe} of {nlist} lists: the "
                "vectors have little cluster structure, and an exact scan may be as fast "
                "(embed --backend exact)"
            )
        return nprobe

    def open(self, vectors: np.ndarray, folder: Path, settings: dict) -> IVFSearcher:
        try:
            centroids = np.load(folder / "centroids.npy", allow_pickle=False)
            assign = np.load(folder / "assign.npy", allow_pickle=False)
        except FileNotFoundError as exc:
            raise SarkitError(f"{exc.filename}: missing (the index is damaged)") from None
        except (OSError, ValueError) as exc:
            raise SarkitError(f"{folder}: damaged faiss-ivf files ({exc})") from None
        if len(assign) != len(vectors) or centroids.shape[1:] != vectors.shape[1:]:
            raise SarkitError(f"{folder}: faiss-ivf files do not fit the vectors (embed again)")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        return IVFSearcher(self._index(centroids, x, assign), x, int(settings["nprobe"]))
