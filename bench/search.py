"""Benchmark `sarkit embed` and `sarkit search` on the CPU.

    .venv/bin/python bench/search.py [--sizes 10000,100000,1000000] [--queries 200]
        [--tiles 256] [--embed-models vit_tiny_patch16_224,vit_base_patch16_224] [--dim 256]
        [--indexes faiss-ivf,faiss-ivfpq,hnsw]

1. Embedding: tiles/s of the real `embed` path (read + preprocess with -j 2 threads, the
   vision tower, chunks written) over --tiles MSTAR chips (../shared/data), for a
   random-init KnowLIP of each --embed-models ViT at 224 px with the offline MiniLM text
   tower (speed does not depend on the weights).
2. Query latency at each --sizes: synthetic unit vectors of dimension --dim (KnowLIP's ITC
   dimension, embed_dim 256), one query at a time (one thread, as `search` runs one): the
   exact numpy scan against each --indexes: the two FAISS backends as `embed` builds and
   `search` opens them (`faiss-ivf`: IndexIVFFlat; `faiss-ivfpq`: the same lists over 4-bit
   PQ fast-scan codes, candidates re-scored on the stored vectors; both with nprobe
   calibrated at build), and FAISS's IndexHNSWFlat (M 16, efSearch raised until the same
   calibration queries reach recall@10 0.95; a comparison, not a backend). Build s, open s
   (reading the backend's files), p50 / p99 ms, recall@10 against the exact top 10, and the
   memory an index holds beyond the stored vectors (from its sizes, and the RSS growth).
   The load average at the start and the end is printed: the figures depend on it.

Synthetic data: real image embeddings are clustered, so the vectors are n / 100 cluster
centres plus Gaussian noise (cosine to the centre ~0.71, between two tiles of a cluster
~0.5, between clusters ~0 +- 0.06); queries are centres plus more noise (cosine to their
centre ~0.55, to its tiles ~0.39), like a text query that sits apart from the image vectors
(the modality gap). The structure decides the IVF's recall: with noisier clusters (tiles of
a cluster at cosine ~0.2, queries at ~0.3 to them) a query's true top 10 at 1M vectors is
barely above the best of a million unrelated ones (~0.3), and the calibration needed 1,228
of 2,000 lists with the flat IVF (315 ms, slower than no index would be on a quiet
machine). Uniform random vectors on the sphere are the worst case, where no index beats a
scan. Vectors are generated in blocks of 100k; one index is held at a time (peak memory at
1M: ~2.5 GB: the vectors and the flat IVF's or HNSW's copy of them).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SARKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO))


def synthetic(n: int, d: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = max(10, n // 100)
    centres = rng.standard_normal((k, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        block = centres[rng.integers(0, k, e - s)]
        block += 1.0 * rng.standard_normal((e - s, d), dtype=np.float32) / np.sqrt(d)
        x[s:e] = block / np.linalg.norm(block, axis=1, keepdims=True)
    q = centres[rng.integers(0, k, queries)]
    q = q + 1.5 * rng.standard_normal(q.shape, dtype=np.float32) / np.sqrt(d)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q.astype(np.float32)


def latency(searcher, q: np.ndarray, k: int = 10) -> tuple[list[float], np.ndarray]:
    times, found = [], []
    searcher.search(q[:1], k)  # warm up
    for row in q:
        t0 = time.perf_counter()
        _, idx = searcher.search(row[None], k)
        times.append((time.perf_counter() - t0) * 1e3)
        found.append(idx[0])
    return times, np.stack(found)


def rss_mb() -> float:
    """Resident memory now (not the peak): the growth across an open is what it holds."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def structure_mb(searcher, folder: Path) -> float:
    """What the index structure holds, from its sizes (RSS growth under-counts when the
    freed memory of the index before is reused): the flat IVF's copy of the vectors and
    ids, the IVF-PQ file FAISS reads whole, HNSW's copy of the vectors and its links."""
    name = getattr(searcher, "name", "")
    if name == "exact":
        return 0.0
    index = searcher.index
    if name == "faiss-ivf":
        return (index.ntotal * (index.code_size + 8) + index.nlist * index.d * 4) / 2**20
    if name == "faiss-ivfpq":
        return (folder / "ivfpq.faiss").stat().st_size / 2**20
    h = index.hnsw
    links = h.neighbors.size() * 4 + h.levels.size() * 4 + h.offsets.size() * 8
    return (index.ntotal * index.d * 4 + links) / 2**20


class HNSWSearcher:
    """FAISS IndexHNSWFlat, for comparison only (not a sarkit backend): efSearch raised
    until the backends' calibration queries reach recall@10 0.95, as their nprobe is."""

    exact = False
    name = "hnsw"

    def __init__(self, x: np.ndarray, m: int):
        import faiss

        self.index = faiss.IndexHNSWFlat(x.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = 40
        self.index.add(x)

    def search(self, q: np.ndarray, k: int, allowed=None):
        from sarkit.search.backends import few_threads

        with few_threads(len(q)):
            return self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)

    def tune(self, q: np.ndarray, truth: np.ndarray) -> int:
        from sarkit.search.backends import recall_at

        for ef in (16, 32, 64, 128, 256, 512):
            self.index.hnsw.efSearch = ef
            if recall_at(self.search(q, 10)[1], truth) >= 0.95:
                break
        return ef


def bench_queries(sizes: list[int], d: int, nq: int, kinds: list[str]) -> list[tuple]:
    """Per size: (n, index, build s, open s, p50 ms, p99 ms, recall@10, MB, RSS MB)."""
    import gc

    from sarkit.search.backends import (
        ExactSearcher,
        IVFBackend,
        IVFPQBackend,
        calibration_queries,
        exact_top,
        recall_at,
    )

    out = []
    for n in sizes:
        x, q = synthetic(n, d, nq)
        truth = exact_top(x, q, 10)
        t_ex, found = latency(ExactSearcher(x), q)
        assert recall_at(found, truth) == 1.0
        row = (n, "exact", "", "", np.percentile(t_ex, 50), np.percentile(t_ex, 99), 1.0, 0.0, 0.0)
        out.append(row)
        log_row(row, os.getloadavg()[0])
        for kind in kinds:
            gc.collect()
            with tempfile.TemporaryDirectory(prefix="sarkit-bench-search-") as tmp:
                if kind == "hnsw":
                    before = rss_mb()
                    t0 = time.perf_counter()
                    searcher = HNSWSearcher(x, 16)
                    ef = searcher.tune(*calibration_queries(x, np.random.default_rng(0)))
                    built, opened, name = time.perf_counter() - t0, "", f"hnsw M 16 ef {ef}"
                else:
                    backend = {"faiss-ivf": IVFBackend, "faiss-ivfpq": IVFPQBackend}[kind]()
                    t0 = time.perf_counter()
                    settings = backend.build(x, Path(tmp))
                    built = time.perf_counter() - t0
                    gc.collect()
                    before = rss_mb()
                    t0 = time.perf_counter()
                    searcher = backend.open(x, Path(tmp), settings)
                    opened = time.perf_counter() - t0
                    name = f"{kind} nlist {settings['nlist']} nprobe {settings['nprobe']}"
                    if "rerank_factor" in settings:
                        name += f" x{settings['rerank_factor']}"
                held = rss_mb() - before
                size = structure_mb(searcher, Path(tmp))
                times, found = latency(searcher, q)
            row = (n, name, built, opened, np.percentile(times, 50), np.percentile(times, 99),
                   recall_at(found, truth), size, held)  # fmt: skip
            out.append(row)
            log_row(row, os.getloadavg()[0])
            del searcher
        del x
    return out


def log_row(row: tuple, load: float) -> None:
    """The row at once on stderr (a 1M run takes long enough to be stopped)."""
    n, name, built, opened, p50, p99, rec, size, held = row
    built = f"built {built:.1f} s, " if built != "" else ""
    print(f"n={n} {name}: {built}p50 {p50:.2f} ms p99 {p99:.2f} ms recall {rec:.3f}, "
          f"{size:.0f} MB ({held:.0f} MB RSS) (load {load:.1f})", file=sys.stderr,
          flush=True)  # fmt: skip


def random_run(folder: Path, vision: str, image_size: int) -> Path:
    from sarkit.model.knowlip import KnowLIP, KnowLIPConfig
    from sarkit.model.weights import save_weights

    config = KnowLIPConfig(vision=vision, image_size=image_size, queue_size=0)
    folder.mkdir(parents=True, exist_ok=True)
    lip = KnowLIP(config)
    (folder / "model.json").write_text(config.to_json())
    save_weights(lip, folder / "model.safetensors")
    return folder


def bench_embed(models: list[str], tiles: int) -> list[tuple]:
    import json

    import torch

    from sarkit import log
    from sarkit.report import Report
    from sarkit.search.embed import EmbedOptions, embed

    log.configure(quiet=True)
    root = SHARED / "mstar" / "train"
    paths = sorted(root.rglob("*.jpeg"))[:tiles]
    if not paths:
        print(f"no MSTAR chips under {root}: embedding not measured", file=sys.stderr)
        return []
    out = []
    with tempfile.TemporaryDirectory(prefix="sarkit-bench-embed-") as tmp:
        recs = Path(tmp) / "recs.jsonl"
        recs.write_text("".join(json.dumps({"id": str(p), "path": str(p)}) + "\n" for p in paths))
        for vision in models:
            run = random_run(Path(tmp) / vision, vision, 224)
            options = EmbedOptions([str(recs)], Path(tmp) / f"{vision}.index", run, 32, 2, 1024)
            t0 = time.perf_counter()
            report = Report("embed")
            embed(options, report)
            seconds = time.perf_counter() - t0  # with loading and hashing the run
            rate = float(report.notes["tiles/s"])  # the embedding loop alone
            out.append((vision, len(paths), seconds, rate, torch.get_num_threads()))
            print(f"{vision}: {rate:.1f} tiles/s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--embed-models", default="vit_tiny_patch16_224,vit_base_patch16_224")
    ap.add_argument("--indexes", default="faiss-ivf,faiss-ivfpq,hnsw")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    models = [m for m in args.embed_models.split(",") if m]
    kinds = [k for k in args.indexes.split(",") if k]
    load0 = os.getloadavg()
    emb = bench_embed(models, args.tiles) if models and args.tiles else []
    rows = bench_queries(sizes, args.dim, args.queries, kinds) if sizes else []
    load1 = os.getloadavg()
    print(f"\nload average (1, 5, 15 min) at the start {load0[0]:.1f} {load0[1]:.1f} "
          f"{load0[2]:.1f}, at the end {load1[0]:.1f} {load1[1]:.1f} {load1[2]:.1f}")  # fmt: skip
    if emb:
        print("\nembedding (sarkit embed, 224 px, batch 32, -j 2, one process)")
        print("(tiles/s: the embedding loop; seconds: the whole call, loading the run too)")
        print(f"{'vision':<24} {'tiles':>6} {'seconds':>8} {'tiles/s':>8} {'threads':>7}")
        for v, n, s, r, t in emb:
            print(f"{v:<24} {n:>6} {s:>8.1f} {r:>8.1f} {t:>7}")
    if rows:
        print(f"\nquery latency, d={args.dim}, {args.queries} single queries, k=10, one thread")
        print("(MB: the index structure beyond the stored vectors, from its sizes; RSS MB: the")
        print(" resident growth across opening it, low where freed memory was reused)")
        print(
            f"{'vectors':>9} {'index':<44} {'build s':>7} {'open s':>6} {'p50 ms':>7} "
            f"{'p99 ms':>7} {'recall@10':>9} {'MB':>6} {'RSS MB':>6}"
        )
        for n, name, built, opened, p50, p99, rec, size, held in rows:
            b = f"{built:.1f}" if built != "" else ""
            o = f"{opened:.2f}" if opened != "" else ""
            print(f"{n:>9} {name:<44} {b:>7} {o:>6} {p50:>7.2f} {p99:>7.2f} {rec:>9.3f} "
                  f"{size:>6.0f} {held:>6.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
