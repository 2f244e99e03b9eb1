"""Benchmark the feature step of `sarkit filter` against a plain per-tile scikit-image loop.

    .venv/bin/python bench/filter.py [--tiles 240] [--repeats 3] [--workdir DIR]

Tiles: `sarkit slice` of the real Umbra Mount Yasur scene at 500 m and 250 m (841 and 421
px) plus the 36 HRSID JPEGs (800 px), cycled to --tiles tiles (so every method reads the
same files from the same warm page cache). Timed, in this one script:
  skimage   the plain loop a user would write: read the tile, skimage block_reduce mean to
            the same working size, fixed 32-level quantisation, graycomatrix (3 distances,
            4 angles), graycoprops (6 properties). GLCM features only. It reads with
            sarkit's reader (PIL for JPEG, GDAL for GeoTIFF), so the ratio is the feature
            work alone: reading costs the same for both.
  sarkit    sarkit.quality's feature step as `sarkit filter` runs it (its own process pool
            and chunking): the same GLCM plus nodata regions, histogram statistics, bright
            scatterers, edges and the structure score.
each at 1 and 2 processes (best of --repeats). Prints tiles/s, sarkit's time per tile over
the plain loop's (target < 1.25) and each method's speed-up from 1 to 2 processes (target:
near 2 on an idle 2-core machine).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SARKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
WORKING = 256
DISTANCES = (1, 2, 4)
ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")


def skimage_features(path: str) -> dict:
    from skimage.feature import graycomatrix, graycoprops
    from skimage.measure import block_reduce

    from sarkit.quality.features import read_pixels

    a = read_pixels(path)
    f = max(1, round(min(a.shape) / WORKING))
    small = block_reduce(a, (f, f), np.mean) if f > 1 else a
    q = (small * (32 / 256)).astype(np.uint8)
    glcm = graycomatrix(q, DISTANCES, ANGLES, levels=32)
    return {p: graycoprops(glcm, p).mean(axis=1).tolist() for p in PROPS}


def run_skimage(paths: list[str], jobs: int) -> float:
    start = time.perf_counter()
    if jobs == 1:
        for p in paths:
            skimage_features(p)
    else:
        with ProcessPoolExecutor(jobs) as pool:
            list(pool.map(skimage_features, paths, chunksize=8))
    return time.perf_counter() - start


def run_sarkit(paths: list[str], jobs: int) -> float:
    from sarkit.quality import FilterOptions
    from sarkit.quality.rules import BUILTIN_FILTERS
    from sarkit.quality.screen import _measured

    options = FilterOptions(jobs=jobs)
    records = ({"id": str(i), "path": p} for i, p in enumerate(paths))
    start = time.perf_counter()
    n = sum(
        1 for _, status, _ in _measured(records, list(BUILTIN_FILTERS), options) if status == "ok"
    )
    elapsed = time.perf_counter() - start
    assert n == len(paths), f"only {n} of {len(paths)} tiles measured"
    return elapsed


def make_tiles(workdir: Path) -> list[str]:
    scene = SHARED / "scenes" / "umbra_yasur" / "umbra_mount_yasur.tiff"
    if not scene.exists():
        raise SystemExit(f"real data not found: {scene}")
    out = workdir / "tiles"
    records = workdir / "tiles.jsonl"
    if not records.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sarkit",
                "-q",
                "slice",
                str(scene),
                "-o",
                str(out),
                "--ground-size",
                "500,250",
                "--records",
                str(records),
            ],
            check=True,
        )
    import json

    paths = [json.loads(line)["path"] for line in records.read_text().splitlines() if line]
    paths += sorted(glob.glob(str(SHARED / "hrsid_mini" / "images" / "*.jpg")))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", type=int, default=240)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sarkit-bench-filter"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = make_tiles(args.workdir)
    paths = [base[i % len(base)] for i in range(args.tiles)]
    # warm the page cache and the imports of both methods
    run_skimage(base, 1)
    run_sarkit(base, 1)
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.repeats):
        for jobs in (1, 2):
            for name, fn in (("skimage", run_skimage), ("sarkit", run_sarkit)):
                t = fn(paths, jobs)
                best[name, jobs] = min(best.get((name, jobs), float("inf")), t)
    n = len(paths)
    print(
        f"{n} tiles ({len(base)} distinct: Umbra 841/421 px, HRSID 800 px), "
        f"best of {args.repeats}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'method':10s} {'procs':>5s} {'tiles/s':>9s} {'ms/tile':>8s} "
        f"{'vs skimage':>10s} {'speed-up':>9s}"
    )
    for jobs in (1, 2):
        for name in ("skimage", "sarkit"):
            t = best[name, jobs]
            ratio = t / best["skimage", jobs]
            speedup = best[name, 1] / t
            print(
                f"{name:10s} {jobs:5d} {n / t:9.1f} {1000 * t / n:8.2f} "
                f"{ratio:10.2f} {speedup:9.2f}"
            )
    print("target: sarkit/skimage time < 1.25 at each process count; speed-up near 2.00")


if __name__ == "__main__":
    main()
