"""Where an IVF query's time goes, and what FAISS index reaches the 1M target: a sweep.

    .venv/bin/python bench/search_sweep.py [--n 1000000] [--nlist 2000]
        [--probes 16,32,64,128,256,364] [--kinds flat,sq8,pq64:50/100/200,pq128:30/100]

bench/search.py's synthetic vectors (d = 256) and its 200 queries ("bench"), plus 100 of
the backends' calibration queries (stored vectors moved off themselves: "calib"). One
k-means (spherical, 10 iterations, 64 vectors a list, FAISS's threads) gives the lists;
over them, for each kind and nprobe, one query at a time on one thread: p50 / p99 ms, the
coarse quantiser's and the list scan's share (FAISS's IVF statistics; the fast-scan index
does not fill them), recall@10 against the exact top 10 of both query sets.

- ``flat``: IndexIVFFlat (float vectors in the lists; ``faiss-ivf``).
- ``sq8``: IndexIVFScalarQuantizer, 8 bits a dimension, the best 20 re-scored exactly.
- ``pqM:R1/R2``: IndexIVFPQFastScan, M sub-quantizers of 4 bits on the residuals, the best
  R candidates re-scored exactly on the float vectors (``faiss-ivfpq`` is pq64).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def say(*parts: object) -> None:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    stamp = f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f} peak {rss:.2f} GB]"
    print(stamp, *parts, flush=True)


def timed(what: str, fn: Callable):
    t0 = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    out = fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    say(f"{what}: wall {time.perf_counter() - t0:.1f} s, cpu {cpu:.1f} s")
    return out


def main() -> None:
    import faiss
    from search import synthetic

    from sarkit.search.backends import calibration_queries, recall_at

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--nlist", type=int, default=2000)
    ap.add_argument("--probes", default="16,32,64,128,256,364")
    ap.add_argument("--kinds", default="flat,sq8,pq64:50/100/200,pq128:30/100")
    args = ap.parse_args()
    probes = [int(p) for p in args.probes.split(",")]
    x, qb = timed("vectors", lambda: synthetic(args.n, 256, 200))
    n, d = x.shape
    rng = np.random.default_rng(5)
    qc, tc = calibration_queries(x, rng)
    qc, tc = qc[:100], tc[:100]
    tb = timed("exact top 10", lambda: faiss.knn(qb, x, 10, metric=faiss.METRIC_INNER_PRODUCT)[1])
    sample = x[np.sort(rng.choice(n, min(n, 64 * args.nlist), replace=False))]
    km = faiss.Kmeans(d, args.nlist, niter=10, seed=0, spherical=True, verbose=False)
    threads = faiss.omp_get_max_threads()
    what = f"k-means {args.nlist} lists on {len(sample)} ({threads} threads)"
    timed(what, lambda: km.train(sample))

    def quantizer():
        qz = faiss.IndexFlatIP(d)
        qz.add(km.centroids)
        return qz

    def latency(fn, q):
        fn(q[:1])
        times, found = [], []
        for row in q:
            t0 = time.perf_counter()
            found.append(fn(row[None])[0])
            times.append((time.perf_counter() - t0) * 1e3)
        return np.percentile(times, 50), np.percentile(times, 99), np.stack(found)

    def sweep(name, index, depth=None):
        def fn(q):
            if depth is None:
                return index.search(q, 10)[1]
            cand = index.search(q, depth)[1][0]
            cand = cand[cand >= 0]
            return cand[np.argsort(-(x[cand] @ q[0]))[:10]][None]

        faiss.omp_set_num_threads(1)
        for p in probes:
            index.nprobe = p
            stats = faiss.cvar.indexIVF_stats
            stats.reset()
            p50, p99, fb = latency(fn, qb)
            quant, scan = stats.quantization_time / len(qb), stats.search_time / len(qb)
            fc = latency(fn, qc)[2]
            say(
                f"{name} nprobe {p}{f' re-rank {depth}' if depth else ''}: p50 {p50:.2f} "
                f"p99 {p99:.2f} ms (quantiser {quant:.2f}, lists {scan:.2f} ms), recall@10 "
                f"bench {recall_at(fb, tb):.3f} calib {recall_at(fc, tc):.3f}"
            )
        faiss.omp_set_num_threads(threads)

    for kind in args.kinds.split(","):
        name, _, depths = kind.partition(":")
        if name == "flat":
            from faiss.contrib.ivf_tools import add_preassigned

            qz = quantizer()
            assign = timed("assign", lambda qz=qz: qz.search(x, 1)[1][:, 0].copy())
            index = faiss.IndexIVFFlat(qz, d, args.nlist, faiss.METRIC_INNER_PRODUCT)
            index.is_trained = True
            timed("flat add", lambda index=index, a=assign: add_preassigned(index, x, a))
            sweep("ivf-flat", index)
        elif name == "sq8":
            index = faiss.IndexIVFScalarQuantizer(quantizer(), d, args.nlist,
                                                  faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT, False)  # fmt: skip
            train = x[np.sort(rng.choice(n, min(n, 65536), replace=False))]
            timed("sq8 train", lambda index=index, train=train: index.train(train))
            timed("sq8 add", lambda index=index: index.add(x))
            sweep("ivf-sq8", index, 20)
        elif name.startswith("pq"):
            m = int(name[2:])
            index = faiss.IndexIVFPQFastScan(quantizer(), d, args.nlist, m, 4,
                                             faiss.METRIC_INNER_PRODUCT)  # fmt: skip
            index.by_residual = True
            train = x[np.sort(rng.choice(n, min(n, 65536), replace=False))]
            faiss.omp_set_num_threads(1)
            timed(f"pq{m} train (1 thread)", lambda index=index, train=train: index.train(train))
            faiss.omp_set_num_threads(threads)
            timed(f"pq{m} add", lambda index=index: index.add(x))
            for depth in depths.split("/"):
                sweep(f"ivf-pq{m}x4 fast-scan", index, int(depth))
        else:
            raise SystemExit(f"--kinds: unknown {name!r}")
        del index
    say("done")


if __name__ == "__main__":
    main()
