"""Benchmark `sarkit embed` and `sarkit search` on the CPU.

    .venv/bin/python bench/search.py [--sizes 10000,100000,1000000] [--queries 200]
        [--tiles 256] [--embed-models vit_tiny_patch16_224,vit_base_patch16_224] [--dim 256]

1. Embedding: tiles/s of the real `embed` path (read + preprocess with -j 2 threads, the
   vision tower, chunks written) over --tiles MSTAR chips (../shared/data), for a
   random-init KnowLIP of each --embed-models ViT at 224 px with the offline MiniLM text
   tower (speed does not depend on the weights).
2. Query latency at each --sizes: synthetic unit vectors of dimension --dim (KnowLIP's ITC
   dimension, embed_dim 256), one query at a time: the exact numpy scan against the FAISS
   IVF (`faiss-ivf`: nlist ~ 4 sqrt(n), nprobe calibrated at build), p50 / p99 ms, and
   recall@10 of the IVF against the exact top 10.

Synthetic data: real image embeddings are clustered, so the vectors are n / 100 cluster
centres plus Gaussian noise (cosine to the centre ~0.71, between two tiles of a cluster
~0.5, between clusters ~0 +- 0.06); queries are centres plus more noise (cosine to their
centre ~0.55, to its tiles ~0.39), like a text query that sits apart from the image vectors
(the modality gap). The structure decides the IVF's recall: with noisier clusters (tiles of
a cluster at cosine ~0.2, queries at ~0.3 to them) a query's true top 10 at 1M vectors is
barely above the best of a million unrelated ones (~0.3), and the calibration needed 1,228
of 2,000 lists (315 ms, slower than no index would be on a quiet machine). Uniform random
vectors on the sphere are the worst case, where no index beats a scan. Vectors are
generated in blocks of 100k (peak memory at 1M: ~2.3 GB: the vectors and the IVF's copy).
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


def bench_queries(sizes: list[int], d: int, nq: int) -> list[tuple]:
    from sarkit.search.backends import ExactSearcher, IVFBackend, recall_at

    out = []
    for n in sizes:
        x, q = synthetic(n, d, nq)
        exact = ExactSearcher(x)
        t_ex, truth = latency(exact, q)
        with tempfile.TemporaryDirectory(prefix="sarkit-bench-search-") as tmp:
            t0 = time.perf_counter()
            settings = IVFBackend().build(x, Path(tmp))
            built = time.perf_counter() - t0
            t0 = time.perf_counter()
            ivf = IVFBackend().open(x, Path(tmp), settings)
            opened = time.perf_counter() - t0
            t_ivf, found = latency(ivf, q)
        rec = recall_at(found, truth)
        out.append((n, "exact", np.percentile(t_ex, 50), np.percentile(t_ex, 99), 1.0, "", ""))
        out.append(
            (
                n,
                f"faiss-ivf nlist {settings['nlist']} nprobe {settings['nprobe']}",
                np.percentile(t_ivf, 50),
                np.percentile(t_ivf, 99),
                rec,
                f"{built:.1f}",
                f"{opened:.2f}",
            )
        )
        print(
            f"n={n}: exact p50 {out[-2][2]:.2f} ms, ivf p50 {out[-1][2]:.2f} ms recall {rec:.3f}",
            file=sys.stderr,
            flush=True,
        )
        del x, exact, ivf
    return out


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
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    models = [m for m in args.embed_models.split(",") if m]
    emb = bench_embed(models, args.tiles) if models and args.tiles else []
    rows = bench_queries(sizes, args.dim, args.queries) if sizes else []
    if emb:
        print("\nembedding (sarkit embed, 224 px, batch 32, -j 2, one process)")
        print("(tiles/s: the embedding loop; seconds: the whole call, loading the run too)")
        print(f"{'vision':<24} {'tiles':>6} {'seconds':>8} {'tiles/s':>8} {'threads':>7}")
        for v, n, s, r, t in emb:
            print(f"{v:<24} {n:>6} {s:>8.1f} {r:>8.1f} {t:>7}")
    if rows:
        print(f"\nquery latency, d={args.dim}, {args.queries} single queries, k=10")
        print(
            f"{'vectors':>9} {'index':<34} {'p50 ms':>7} {'p99 ms':>7} {'recall@10':>9} "
            f"{'build s':>7} {'open s':>6}"
        )
        for n, name, p50, p99, rec, built, opened in rows:
            print(f"{n:>9} {name:<34} {p50:>7.2f} {p99:>7.2f} {rec:>9.3f} {built:>7} {opened:>6}")


if __name__ == "__main__":
    main()
