"""Benchmark the pretraining loader alone: pairs/s per core, and peak memory per rank.

    .venv/bin/python bench/loader.py [--tiles 512] [--batches 24] [--repeat 3]
                                     [--records 1000000] [--before-records 100000,200000]

Tiles: 256 px uint8 GeoTIFFs written as `sarkit slice` writes them (256 x 256 blocks, zstd
level 1, nodata 0, CRS and transform), cut from the real Umbra scene in ../shared/data
(synthetic speckle when it is absent). Records: the 8 terrain fields of the published
FUSAR-KLIP captions (../shared/data/reference), each text made unique per record (so no
text cache flatters a pipeline), plus quality features and caption provenance, about
3.5 KB of JSON a record as a captioned record is. The 1M records of the memory figure use
the captions as they are (cycled): their token columns are as large, and building the
table does not spend 20 minutes tokenising on a shared 2-core machine.

pairs/s per core: one process, one torch thread, no DataLoader workers (the work a worker
does, on one core), counted per CPU second of the process (time.process_time: what one
core wholly given to the loader does, on a shared machine too; the wall-clock rate, which
the machine's load lowers, is shown beside it): tile decode, crop/flip/turn, resize to 224,
normalise, tokenise (or read cached tokens), collate, for batches of 32 at --max-tokens 256
(pretrain's default).
  before  TileDataset + ImageTextCollate: what `sarkit pretrain` used until this change
  after   PairDataset over the cached record table (sarkit.train.pairs / .table)
The two alternate --repeat times; the medians are compared. Tokenising the table once is
timed apart (records/s), as it is paid once per dataset, not per epoch.

Peak RSS per rank (ru_maxrss of a fresh process: records, dataset, 8 batches through the
sampler of the whole set; the model is not built):
  before  at --before-records (a list of dicts; a million would take ~15 GB here, so the
          figure for 1M is the measured per-record slope times 1M, marked as such)
  after   at --records (1M): building the table (streamed), then a training process that
          maps it; a DataLoader worker's peak is shown as well.
The load average is printed with every figure (the machine is shared). The last line is
``pairs/s per core: N`` (the after pipeline's median).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SARKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO))
FIELDS = ("Terrain", "Functionality", "Distribution", "Layout", "Boundary", "Buildings",
          "Roads", "Water")  # fmt: skip
SIZE, BATCH, TOKENS = 224, 32, 256


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def make_tiles(folder: Path, n: int) -> list[str]:
    """n slice-like tiles (relative names under `folder`)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    scene = SHARED / "scenes" / "umbra_yasur" / "umbra_mount_yasur.tiff"
    rng = np.random.default_rng(0)
    if scene.exists():
        with rasterio.open(scene) as src:
            pixels = src.read(1)
    else:
        print(f"# {scene} absent: synthetic speckle tiles", file=sys.stderr)
        pixels = rng.gamma(1.0, 60.0, (2000, 2000)).clip(0, 255).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(n):
        r, c = rng.integers(0, pixels.shape[0] - 256), rng.integers(0, pixels.shape[1] - 256)
        name = f"tiles/t{k:05d}.tif"
        path = folder / name
        path.parent.mkdir(exist_ok=True)
        profile = dict(driver="GTiff", width=256, height=256, count=1, dtype="uint8", nodata=0,
                       tiled=True, blockxsize=256, blockysize=256, compress="zstd",
                       zstd_level=1, crs="EPSG:32759",
                       transform=from_origin(336000 + c, 7840000 - r, 0.59, 0.59))  # fmt: skip
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(pixels[r : r + 256, c : c + 256], 1)
        names.append(name)
    return names


def captions() -> list[dict]:
    ref = SHARED / "reference" / "fusar_klip_caption_part1.json"
    if ref.exists():
        return [{f: str(c.get(f, "")) for f in FIELDS} for c in json.loads(ref.read_text())]
    words = "bright ships moor along the quay beside dark calm water and a long runway".split()
    rng = random.Random(0)
    return [{f: " ".join(rng.choices(words, k=20)) for f in FIELDS} for _ in range(200)]


def record(k: int, tile: str, cap: dict, rng: random.Random, unique: bool = True) -> dict:
    """A captioned record of about 3.5 KB, as `sarkit caption` writes one."""
    texts = {f: f"{v} (tile {k})" if unique else v for f, v in cap.items()}
    quality = {f"glcm_{p}_{a}": round(rng.random() * 100, 4) for p in
               ("contrast", "homogeneity", "energy", "correlation", "dissimilarity", "asm")
               for a in (0, 45, 90, 135)}  # fmt: skip
    quality.update(entropy=round(rng.random() * 8, 4), nodata_frac=0.0, score=0.9, keep=True)
    return {
        "id": f"umbra_mount_yasur/M/r{k // 1000:03d}_c{k % 1000:03d}", "path": tile,
        "scene": "scenes/umbra_yasur/umbra_mount_yasur.tiff", "scale": "M",
        "parent": f"umbra_mount_yasur/L/r{k // 9000:03d}_c000", "window": [k, k, 256, 256],
        "sensor": "umbra", "band": "X", "polarization": "VV", "pixel_m": 0.59,
        "ground_m": 151.0, "crs": "EPSG:32759",
        "transform": [0.59, 0.0, 336000.0 + k, 0.0, -0.59, 7840000.0],
        "geo": {"center": [169.44, -19.53], "footprint": [[169.44 + i * 1e-3, -19.53] for i in
                range(5)], "place": {"name": "Isangel", "admin1": "Tafea", "country": "VU"}},
        "quality": quality, "texts": texts,
        "caption": {"backend": "gpt-4.1", "prompt_sha256": f"{rng.getrandbits(256):064x}",
                    "tokens_in": 1830, "tokens_out": 412, "chain": ["L", "M", "S"],
                    "reasoning": " ".join(texts.values())[:900]},
    }  # fmt: skip


def write_records(path: Path, n: int, tiles: list[str], unique: bool = True) -> None:
    rng = random.Random(0)
    caps = captions()
    with open(path, "w") as fh:
        for k in range(n):
            rec = record(k, tiles[k % len(tiles)], caps[k % len(caps)], rng, unique)
            fh.write(json.dumps(rec) + "\n")


def codec():
    from sarkit.model.text import TextCodec

    return TextCodec.from_pretrained(None, FIELDS, TOKENS)


def before_dataset(path: Path):
    from sarkit.records import load_all
    from sarkit.train.data import Augment, ImageTextCollate, TileDataset
    from sarkit.train.pretrain import usable_records

    records = usable_records(load_all(path, required=("id", "path")), str(path))
    ds = TileDataset(records, SIZE, path.parent, Augment(), 0, 0.3, 0.2)
    return ds, ImageTextCollate(ds.records, codec())


def after_dataset(path: Path):
    from sarkit.train.data import Augment
    from sarkit.train.pairs import PairDataset, passthrough
    from sarkit.train.table import RecordFiles, open_table

    files = RecordFiles([path])
    c = codec()
    table = open_table(files.paths, files.items, c, files.kind, str(path))
    return PairDataset(table, SIZE, path.parent, Augment(), 0, 0.3, 0.2, 1.0, c.pad_id), passthrough


def rate(ds, collate, batches: int, workers: int = 0) -> tuple[float, float]:
    """(pairs per wall second, pairs per CPU second of this process) of a DataLoader over
    `ds`, 2 warm-up batches not counted. With no workers and one thread the second is the
    rate of one core given wholly to the loader, whatever else the machine runs."""
    import torch

    from sarkit.train.data import EpochSampler

    sampler = EpochSampler(len(ds), 0)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, sampler=sampler,
                                         num_workers=workers, collate_fn=collate)  # fmt: skip
    it = iter(loader)
    for _ in range(2):
        next(it)
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    n = batches * BATCH
    return n / (time.perf_counter() - t), n / (time.process_time() - cpu)


def rss_child(kind: str, path: Path, workers: int) -> None:
    """Run in a fresh process: build the dataset, load 8 batches, print peak RSS (MB)."""
    import torch

    torch.set_num_threads(1)
    from sarkit import log

    log.configure(quiet=True)
    t = time.perf_counter()
    if kind == "build":
        after_dataset(path)
        n = None
    else:
        ds, collate = (before_dataset if kind == "before" else after_dataset)(path)
        n = len(ds)
        rate(ds, collate, 6, workers)
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"rss_mb": self_mb, "worker_mb": kids_mb if workers else None,
                      "n": n, "s": time.perf_counter() - t}))  # fmt: skip


def measure_rss(kind: str, path: Path, workers: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", kind, "--rss-path", str(path),
           "--rss-workers", str(workers)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    got["load"] = load()
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=512)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--records", type=int, default=1_000_000, help="for the RSS of 'after'")
    ap.add_argument("--before-records", default="100000,200000", help="for the RSS of 'before'")
    ap.add_argument("--no-rss", dest="rss", action="store_false")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    ap.add_argument("--rss-path", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rss-workers", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.rss_path, args.rss_workers)
        return
    import torch

    torch.set_num_threads(1)
    from sarkit import log

    log.configure(quiet=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="sarkit-loader-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tiles = make_tiles(work, args.tiles)
        small = work / "pairs.jsonl"
        n_pairs = max(args.tiles, (args.batches + 2) * BATCH)
        write_records(small, n_pairs, tiles)
        t = time.perf_counter()
        after_dataset(small)  # tokenised once into the cache
        tokenise = n_pairs / (time.perf_counter() - t)
        print(f"# tokenised {n_pairs} records once: {tokenise:.0f} records/s ({load()})",
              file=sys.stderr)  # fmt: skip
        got: dict[str, list[float]] = {"before": [], "after": []}
        wall: dict[str, list[float]] = {"before": [], "after": []}
        loads = []
        for k in range(args.repeat):
            for name, make in (("before", before_dataset), ("after", after_dataset)):
                ds, collate = make(small)
                w, c = rate(ds, collate, args.batches)
                got[name].append(c)
                wall[name].append(w)
                loads.append(os.getloadavg()[0])
                print(f"# round {k + 1} {name}: {c:.1f} pairs/CPU-s, {w:.1f} pairs/s wall "
                      f"({load()})", file=sys.stderr)  # fmt: skip
        med = {k: statistics.median(v) for k, v in got.items()}
        med_wall = {k: statistics.median(v) for k, v in wall.items()}
        print(f"torch {torch.__version__}, 1 thread, no workers; {args.tiles} tiles 256 px "
              f"uint8 GeoTIFF (zstd, 256 blocks), {n_pairs} records -> {SIZE} px, batch "
              f"{BATCH}, max tokens {TOKENS}; {args.batches} batches x {args.repeat} rounds, "
              "medians")  # fmt: skip
        print("| loader | pairs/s per core (CPU time) | rounds | pairs/s wall clock |")
        print("|---|---|---|---|")
        for name in ("before", "after"):
            shown = ", ".join(f"{v:.0f}" for v in got[name])
            print(f"| {name} | {med[name]:.0f} | {shown} | {med_wall[name]:.0f} |")
        print(f"speed-up {med['after'] / med['before']:.2f}x; building the table "
              f"(tokenizer load incl.) {tokenise:.0f} records/s; load average during the rounds "
              f"{min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} cores")  # fmt: skip
        if args.rss:
            print()
            print("| loader | records | peak RSS, main (MB) | peak RSS, 1 worker (MB) | note |")
            print("|---|---|---|---|---|")
            points = []
            for n in [int(x) for x in args.before_records.split(",") if x]:
                path = work / f"before-{n}.jsonl"
                write_records(path, n, tiles)
                r = measure_rss("before", path)
                points.append((n, r["rss_mb"]))
                print(f"| before | {n:,} | {r['rss_mb']:.0f} | - | measured, {r['load']} |")
                path.unlink()
            if len(points) >= 2:
                (n0, r0), (n1, r1) = points[0], points[-1]
                slope = (r1 - r0) / (n1 - n0)
                print(f"| before | {args.records:,} | {r0 + slope * (args.records - n0):.0f} |"
                      f" - | extrapolated: {slope * 1024:.1f} KB per record |")  # fmt: skip
            path = work / "big.jsonl"
            t = time.perf_counter()
            # the published captions as they are (each tokenised once: the token columns
            # are as large as with unique texts, the build is not 20 min of tokenising)
            write_records(path, args.records, tiles, unique=False)
            print(f"# wrote {args.records:,} records ({path.stat().st_size / 1e9:.2f} GB) in "
                  f"{time.perf_counter() - t:.0f} s", file=sys.stderr)  # fmt: skip
            b = measure_rss("build", path)
            print(f"| after, building the table | {args.records:,} | {b['rss_mb']:.0f} | - |"
                  f" once per dataset, {b['s']:.0f} s, {b['load']} |")  # fmt: skip
            a = measure_rss("after", path, 1)
            cache = next((work / ".sarkit-cache").glob("big-*"))
            size = sum(p.stat().st_size for p in cache.iterdir()) / 2**20
            print(f"| after, training | {a['n']:,} | {a['rss_mb']:.0f} | "
                  f"{a['worker_mb']:.0f} | table {size:.0f} MB on disk (mapped), "
                  f"{a['load']} |")  # fmt: skip
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"pairs/s per core: {med['after']:.0f}")


if __name__ == "__main__":
    main()
