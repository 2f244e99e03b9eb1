"""The built-in index backends: an exact numpy scan and two FAISS inverted-file indexes.

All are ``sarkit_index_backends`` plugins (``sarkit.search.plugin``). Vectors are unit
length, so inner product = cosine similarity. ``build`` runs once at the end of `sarkit
embed` and writes numpy files or FAISS's own binary format (``faiss.write_index``, not
pickle); ``open`` makes a searcher at query time.

Measured (bench/search.py, docs/results.md, on the shared 2-core machine at load 8-12): an
exact scan costs 1.5-6 ms a query at 10k vectors, 3-9 ms at 20k and grows linearly (0.3-0.5
s at 1M). The IVF must read many lists at 1M (15-27 % of them for recall@10 0.95 on the
synthetic clusters), which is what made the flat IVF slow there (24-104 ms a query):
``faiss-ivfpq`` reads the same lists as 4-bit PQ codes (FAISS fast-scan, 1/32 of the bytes)
and re-scores the best candidates exactly on the stored float vectors: 7-9 ms at 1M, recall
0.98. ``AUTO_MIN`` vectors is where `--backend auto` leaves the exact scan for it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sarkit.errors import SarkitError

AUTO_MIN = 20_000  # vectors from which --backend auto builds faiss-ivfpq (measured)
AUTO_BACKEND = "faiss-ivfpq"
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


@contextlib.contextmanager
def one_faiss_thread() -> Iterator[None]:
    """FAISS on one OpenMP thread for many small parallel steps: training the 4-bit PQ
    (64 tiny k-means) took 110 s of wall clock and 27 CPU-s with 2 threads on the loaded
    2-core machine (the threads spin at every step's barrier), 5 s and 0.7 CPU-s with one."""
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
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
    name = "exact"

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
    """Indices of each query's exact top k (in blocks: 256 queries x 1M scores would be 1 GB)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for s in range(0, len(vectors), 131072):
        sc, ix = top_k(queries @ vectors[s : s + 131072].T, k)
        sc, ix = np.concatenate([best_s, sc], 1), np.concatenate([best_i, ix + s], 1)
        keep = np.lexsort((ix, -sc), axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(sc, keep, 1), np.take_along_axis(ix, keep, 1)
    return best_i


def train_lists(x: np.ndarray, nlist: int, rng: np.random.Generator, seed: int) -> np.ndarray:
    """(nlist, d) unit centroids: spherical k-means over a sample of 64 vectors a list
    (10 iterations; 48 s at 2,000 lists on the loaded 2-core machine)."""
    n, d = x.shape
    sample = x[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))]
    kmeans = _faiss().Kmeans(d, nlist, niter=10, seed=seed, spherical=True, verbose=False)
    kmeans.train(sample)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def calibration_queries(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(queries, their exact top 10) for setting an index's knobs at build time: stored
    vectors moved off themselves (cosine ~0.7 to where they came from), a query near the
    data but on none of it, as a text query is (bench/search.py measures other queries)."""
    n, d = x.shape
    q = x[rng.choice(n, min(CALIBRATION_QUERIES, n), replace=False)]
    q = q + rng.standard_normal(q.shape).astype(np.float32) / np.sqrt(d)
    q = (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    return q, exact_top(x, q, min(10, n))


def calibrate_nprobe(
    recall_of: Callable[[int], float], nlist: int, name: str, warn_share: float = 0.25
) -> int:
    """The smallest nprobe whose calibration recall@10 reaches ``TARGET_RECALL``: steps of
    x1.5, then halving the last step (at 1M vectors 364 lists fell short and 546 was more
    than needed). A warning when it needs over ``warn_share`` of the lists (where a scan
    of the lists costs about what an exact scan does) or does not get there at all."""
    lo, nprobe = 0, 1
    while nprobe < nlist and recall_of(nprobe) < TARGET_RECALL:
        lo, nprobe = nprobe, min(nlist, max(nprobe + 1, round(nprobe * 1.5)))
    reached = nprobe < nlist or recall_of(nlist) >= TARGET_RECALL
    while reached and nprobe - lo > max(1, nprobe // 16):  # within ~6 %
        mid = (lo + nprobe) // 2
        if recall_of(mid) >= TARGET_RECALL:
            nprobe = mid
        else:
            lo = mid
    if not reached or nprobe > nlist * warn_share:
        from sarkit import log

        what = (
            f"needs {nprobe} of {nlist} lists"
            if reached
            else f"is not reached even with all {nlist} lists"
        )
        log.warn(
            f"{name}: recall@10 {TARGET_RECALL} {what}: the vectors have little cluster "
            "structure, and an exact scan may be as good (embed --backend exact)"
        )
    return nprobe


def _probe(nprobe: int, sel: Any = None) -> Any:
    faiss = _faiss()
    if sel is None:
        return faiss.SearchParametersIVF(nprobe=int(nprobe))
    return faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe))


def _selector(allowed: np.ndarray | None) -> tuple[Any, np.ndarray | None]:
    """A FAISS ID selector of the allowed rows (and the id array it points into, which the
    caller keeps alive for the search)."""
    if allowed is None:
        return None, None
    faiss = _faiss()
    ids = np.flatnonzero(allowed).astype(np.int64)
    return faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)), ids


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true top k found (-1 entries never match)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


class IVFSearcher:
    """A FAISS IndexIVFFlat (inner product) over the vectors; filters through an ID
    selector."""

    exact = False
    name = "faiss-ivf"

    def __init__(self, index: Any, vectors: np.ndarray, nprobe: int):
        self.index, self.vectors, self.nprobe = index, vectors, int(nprobe)
        index.nprobe = self.nprobe

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self.vectors))
        sel, _ids = _selector(allowed)  # _ids: the selector points into it
        with few_threads(len(q)):
            scores, idx = self.index.search(q, k, params=_probe(self.nprobe, sel))
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
        centroids = train_lists(x, nlist, rng, seed)
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
        q, truth = calibration_queries(x, rng)
        return calibrate_nprobe(
            lambda nprobe: recall_at(index.search(q, truth.shape[1], params=_probe(nprobe))[1],
                                     truth),
            nlist,
            self.name,
        )  # fmt: skip

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


def pq_split(d: int) -> int:
    """PQ sub-quantizers: 4 dimensions each (64 at d = 256: 32 bytes a vector at 4 bits),
    the largest divisor of d at or under d / 4."""
    m = max(1, d // 4)
    while d % m:
        m -= 1
    return m


RERANK_FACTORS = (2, 5, 10, 20, 50)  # candidates re-scored exactly, per hit asked for
PQ_MIN = 256  # vectors: 16 per 4-bit codebook centroid


class RerankedSearcher:
    """A FAISS IVF-PQ fast-scan index whose ``factor * k`` best candidates (by their codes)
    are re-scored exactly on the stored float vectors: the codes choose, the floats rank."""

    exact = False
    name = "faiss-ivfpq"

    def __init__(self, index: Any, vectors: np.ndarray, nprobe: int, factor: int):
        self.index, self.vectors = index, vectors
        self.nprobe, self.factor = int(nprobe), int(factor)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(self.vectors)
        k = min(k, n)
        depth = min(n, max(k, self.factor * k))
        sel, _ids = _selector(allowed)  # _ids: the selector points into it
        with few_threads(len(q)):
            cand = self.index.search(q, depth, params=_probe(self.nprobe, sel))[1]
            scores = np.full((len(q), k), -np.inf, np.float32)
            idx = np.full((len(q), k), -1, np.int64)
            for r in range(len(q)):
                c = cand[r][cand[r] >= 0]
                s, j = top_k((self.vectors[c] @ q[r])[None], k)
                scores[r, : s.shape[1]], idx[r, : s.shape[1]] = s[0], c[j[0]]
        return scores, idx  # -1: fewer than k found (a narrow filter)


class IVFPQBackend:
    """FAISS IndexIVFPQFastScan (lists as ``faiss-ivf``, residuals in 4-bit PQ codes of 4
    dimensions a byte-half), re-ranked on the stored vectors.

    Stored with FAISS's own binary writer (``ivfpq.faiss``: centroids, codebooks, codes and
    ids; not pickle), about d / 8 + 8 bytes a vector (40 MB at 1M, d = 256) against the flat
    IVF's second copy of the vectors (1 GB). ``nprobe`` is set as ``faiss-ivf``'s (with 20
    candidates re-scored per hit), then the smallest re-rank factor that keeps the
    calibration recall@10 at ``TARGET_RECALL``.
    """

    name = "faiss-ivfpq"
    summary = (
        "FAISS IVF over 4-bit PQ codes (fast-scan), the best candidates re-scored exactly; "
        "nprobe calibrated to recall@10 >= 0.95 (approximate)"
    )
    FILE = "ivfpq.faiss"

    def build(self, vectors: np.ndarray, folder: Path, seed: int = 0) -> dict:
        from sarkit.atomic import atomic_path

        faiss = _faiss()
        n, d = vectors.shape
        if n < PQ_MIN:
            raise SarkitError(
                f"the {self.name} backend needs at least {PQ_MIN} vectors (its codebooks), "
                f"not {n}; an exact scan suits fewer (embed --backend exact: the tiles "
                "embedded are kept)"
            )
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        nlist = n_lists(n)
        rng = np.random.default_rng(seed)
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(train_lists(x, nlist, rng, seed))
        m = pq_split(d)
        index = faiss.IndexIVFPQFastScan(quantizer, d, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
        index.by_residual = True
        index.pq.cp.min_points_per_centroid = 1  # no C++ warning on small archives
        index.pq.cp.seed = seed
        with one_faiss_thread():  # trains the PQ only (the quantizer holds the lists)
            index.train(x[np.sort(rng.choice(n, min(n, 65536), replace=False))])
        index.add(x)  # assigns and packs (add_preassigned would skip fast-scan's packing)
        q, truth = calibration_queries(x, rng)
        searcher = RerankedSearcher(index, x, 1, 20)

        def recall_of(nprobe: int) -> float:
            searcher.nprobe = nprobe
            return recall_at(searcher.search(q, truth.shape[1])[1], truth)

        nprobe = calibrate_nprobe(recall_of, nlist, self.name, warn_share=1.0)  # codes: 1/32
        searcher.nprobe = nprobe
        factor = RERANK_FACTORS[-1]
        for f in RERANK_FACTORS:
            searcher.factor = f
            if recall_at(searcher.search(q, truth.shape[1])[1], truth) >= TARGET_RECALL:
                factor = f
                break
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / self.FILE) as tmp:
            faiss.write_index(index, str(tmp))
        return {
            "nlist": nlist,
            "nprobe": nprobe,
            "pq": f"{m}x4",
            "rerank_factor": factor,
            "target_recall": TARGET_RECALL,
        }

    def open(self, vectors: np.ndarray, folder: Path, settings: dict) -> RerankedSearcher:
        faiss = _faiss()
        path = folder / self.FILE
        if not path.is_file():
            raise SarkitError(f"{path}: missing (the index is damaged)")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
            raise SarkitError(f"{path}: damaged faiss-ivfpq file ({reason})") from None
        if index.ntotal != len(vectors) or index.d != vectors.shape[1]:
            raise SarkitError(f"{path}: does not fit the vectors (embed again)")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        return RerankedSearcher(index, x, settings["nprobe"], settings["rerank_factor"])
