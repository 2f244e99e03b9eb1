"""Caption throughput against a local chat-completions server with a fixed 300 ms latency.

    .venv/bin/python bench/caption.py [--latency 0.3] [--seconds 6]

For concurrency 1, 8 and 32 it captions real Umbra tiles through the `openai` backend and
prints tiles/s as a ratio to the ideal concurrency / latency (target >= 0.9). The baseline
rows send the same number of requests (one pre-encoded tile, no prompts, no parsing) from
bare httpx threads at the same concurrency against the same server: what this machine and
server allow any client. Then 20% of requests fail (429 with Retry-After, 500,
malformed bodies, dropped connections): every tile must be captioned and none twice.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sarkit.caption import CaptionOptions  # noqa: E402
from sarkit.caption.chain import caption_records  # noqa: E402
from sarkit.log import configure  # noqa: E402
from sarkit.report import Report  # noqa: E402

SCENE = Path(os.environ.get("SARKIT_SHARED_DATA", REPO.parent / "shared" / "data")) / (
    "scenes/umbra_yasur/umbra_mount_yasur.tiff"
)


def make_tiles(folder: Path, n: int = 16) -> list[Path]:
    import rasterio
    from rasterio.windows import Window

    paths = []
    with rasterio.open(SCENE) as src:
        for i in range(n):
            r, c = divmod(i, 4)
            data = src.read(1, window=Window(200 + 400 * c, 200 + 400 * r, 256, 256))
            path = folder / f"tile{i:02d}.tif"
            with rasterio.open(
                path, "w", driver="GTiff", width=256, height=256, count=1, dtype="uint8"
            ) as dst:
                dst.write(data, 1)
            paths.append(path)
    return paths


def records(tiles: list[Path], n: int, tag: str) -> list[dict]:
    return [
        {
            "id": f"{tag}/{i:04d}",
            "path": str(tiles[i % len(tiles)]),
            "scene": "umbra",
            "scale": "L",
            "parent": None,
            "window": [0, 0, 256, 256],
            "pixel_m": 0.59,
            "ground_m": 151,
            "sensor": "umbra",
            "band": "X",
            "polarization": "VV",
            "geo": {
                "center": [169.449, -19.527],
                "place": {
                    "name": "Isangel",
                    "admin1": "Tafea",
                    "country": "VU",
                    "distance_km": 19.3,
                },
            },
        }
        for i in range(n)
    ]


class Server:
    def __init__(self, latency: float, fault_rate: float, stats: Path):
        self.stats = stats
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sarkit.llm.fakeserver",
                "--latency",
                str(latency),
                "--fault-rate",
                str(fault_rate),
                "--retry-after",
                "1",
                "--stats-file",
                str(stats),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        line = self.proc.stdout.readline()
        self.url = f"http://127.0.0.1:{line.split()[1]}/v1"

    def close(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        return json.loads(self.stats.read_text())


def bare_latency(url: str, n: int = 5) -> float:
    import httpx

    body = {"model": "x", "messages": [{"role": "user", "content": "Tile base/0 from scene s"}]}
    times = []
    with httpx.Client() as client:
        for _ in range(n):
            t0 = time.perf_counter()
            client.post(f"{url}/chat/completions", json=body).raise_for_status()
            times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2]


def bare_concurrent(url: str, tile: Path, concurrency: int, n: int) -> float:
    """The same requests (one pre-encoded tile) from bare httpx threads: the machine's floor."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from sarkit.llm.image import png_data_url

    image, _ = png_data_url(str(tile))
    content = [
        {"type": "text", "text": "Tile bare/0 from scene s"},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    body = {"model": "x", "messages": [{"role": "user", "content": content}]}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(limits=limits) as client, ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda _: client.post(f"{url}/chat/completions", json=body), range(n)))
        return time.perf_counter() - t0


def caption(recs, url, concurrency, journal=None) -> tuple[list[dict], Report, float]:
    report = Report("caption")
    options = CaptionOptions(
        llm="local",
        base_url=url,
        task="terrain",
        concurrency=concurrency,
        journal=journal,
        retries=8,
        timeout=10,
    )
    t0 = time.perf_counter()
    out = list(caption_records(iter(recs), options, report))
    return out, report, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--seconds", type=float, default=6.0, help="target duration per row")
    args = parser.parse_args()
    configure(quiet=True)
    os.environ.setdefault("SARKIT_DISABLE_PLUGINS", "1")
    tmp = Path(tempfile.mkdtemp(prefix="sarkit-bench-caption-"))
    tiles = make_tiles(tmp)
    rows = []
    server = Server(args.latency, 0.0, tmp / "stats0.json")
    try:
        base = bare_latency(server.url)
        caption(records(tiles, 4, "warmup"), server.url, 2)  # imports and plugins, untimed
        for c in (1, 8, 32):
            n = max(c, int(args.seconds * c / args.latency))
            wall = bare_concurrent(server.url, tiles[0], c, n)
            rows.append(
                (f"bare httpx threads (baseline), {c}", c, n, wall, n / wall, c / args.latency)
            )
            out, report, wall = caption(records(tiles, n, f"c{c}"), server.url, c)
            assert len(out) == n and report.done == n, report.errors
            rows.append((f"sarkit caption -j {c}", c, n, wall, n / wall, c / args.latency))
    finally:
        server.close()

    print(
        f"\nCaption throughput, local server latency {args.latency * 1000:.0f} ms "
        f"(bare single-request round trip: {base * 1000:.0f} ms)\n"
    )
    print("| run | concurrency | tiles | wall s | tiles/s | ideal c/latency | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, c, n, wall, rate, ideal in rows:
        print(
            f"| {name} | {c} | {n} | {wall:.2f} | {rate:.2f} | {ideal:.2f} | {rate / ideal:.3f} |"
        )

    # 20% injected faults at concurrency 32, with a journal: all done, none twice
    n = int(args.seconds * 32 / args.latency)
    server = Server(args.latency, 0.2, tmp / "stats1.json")
    journal = tmp / "faults.journal"
    try:
        out, report, wall = caption(records(tiles, n, "faults"), server.url, 32, str(journal))
    finally:
        stats = server.close()
    ids = [r["id"] for r in out]
    complete = sum(1 for r in out if len(r.get("texts", {})) == 8)
    answered = stats["answered"]
    twice = sum(1 for v in answered.values() if v > 1)
    entries = [json.loads(x) for x in journal.read_text().splitlines()]
    requests = sum(stats["requests"].values())
    print(
        f"\n20% injected faults (429 + Retry-After 1 s, 500, malformed body, dropped "
        f"connection), concurrency 32, {n} tiles:\n"
    )
    print(
        "| tiles | captioned (8 fields) | unique ids out | answered twice by server | "
        "journal entries | requests | faults retried | wall s | tiles/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {n} | {complete} | {len(set(ids))} | {twice} | {len(entries)} | {requests} | "
        f"{requests - n} | {wall:.2f} | {n / wall:.2f} |"
    )
    ok = complete == n == len(set(ids)) == len(ids) == len(entries) and twice == 0
    print("\nevery tile done, none twice:", "yes" if ok else "NO")


if __name__ == "__main__":
    main()
