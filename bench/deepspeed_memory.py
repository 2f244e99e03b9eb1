"""Peak resident memory of ViT-L pretraining under DeepSpeed ZeRO, two processes (torchrun).

    .venv/bin/python bench/deepspeed_memory.py [--presets zero2,zero3,zero3-offload]
        [--vision vit_large_patch16_224] [--steps 3] [--baseline]

For each preset: `torchrun --nproc_per_node 2 -m sarkit pretrain` on real MSTAR chips (batch
2 per process, 224 px, the offline MiniLM text tower, fp32 on the CPU, gloo) for `--steps`
steps with a checkpoint, then a resume from it for one more step. The peak RSS of each rank
(VmHWM from /proc, polled) is printed per process and summed; the target for ViT-L with
zero3-offload is both processes together under 14 GiB. `--baseline` adds, per preset, the
same run with DeepSpeed's stock buffer sizes (a JSON config without sarkit's bucket limits),
so the table shows what the limits save in the same script. Load average is printed: on a
shared machine the timings move with it (the memory does not).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SARKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "tests"))
GIB = 1024**3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(pid: int) -> list[int]:
    """torchrun's children that run sarkit: the ranks, not processes they fork (a forked
    helper inherits the rank's command line and pages, and would count them twice)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids if is_rank(int(k))]


def hwm(pid: int) -> int | None:
    """Peak resident set (bytes) of a live process, from /proc/PID/status."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def is_rank(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"sarkit" in cmd and b"torch.distributed.run" not in cmd


def run(args: list[str], env: dict) -> tuple[list[int], float, str]:
    """Run torchrun; per-rank peak RSS (bytes), wall seconds, stderr tail."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=env)
        peaks: dict[int, int] = {}
        while proc.poll() is None:
            for pid in ranks(proc.pid):
                if (value := hwm(pid)) is not None:
                    peaks[pid] = max(peaks.get(pid, 0), value)
            time.sleep(0.2)
        err.seek(0)
        tail = err.read()[-2000:]
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(args)}\n{tail}")
    return sorted(peaks.values(), reverse=True), time.perf_counter() - start, tail


def stock_config(preset: str, folder: Path) -> str:
    """The preset's stage and offload with DeepSpeed's own buffer defaults."""
    from sarkit.train.engine import DS_PRESETS

    stage, offload = DS_PRESETS[preset]
    zero: dict = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    path = folder / f"{preset}-stock.json"
    path.write_text(json.dumps({"zero_optimization": zero}))
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="zero2,zero3,zero3-offload")
    ap.add_argument("--vision", default="vit_large_patch16_224")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--baseline", action="store_true", help="also DeepSpeed's stock buffers")
    a = ap.parse_args()
    from test_pretrain_data import mstar_records, write_jsonl

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recs = write_jsonl(tmp / "r.jsonl", mstar_records(SHARED / "mstar", "train", 2))
        for preset in a.presets.split(","):
            variants = [(preset, preset)]
            if a.baseline:
                variants.append((f"{preset} (stock buffers)", stock_config(preset, tmp)))
            for label, spec in variants:
                out = tmp / label.replace(" ", "_")
                base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), "-m", "sarkit", "pretrain", str(recs),
                        "-o", str(out), "--vision", a.vision, "--batch-size", "2",
                        "--workers", "0", "--deepspeed", spec, "--save-every", str(a.steps),
                        "--log-every", "1", "--grad-checkpointing"]  # fmt: skip
                peaks, secs, _ = run([*base, "--max-steps", str(a.steps)], env)
                base[base.index("--master_port") + 1] = str(free_port())
                again, secs2, tail = run(
                    [*base, "--max-steps", str(a.steps + 1), "--resume", "latest"], env
                )
                assert "resumed from" in tail, tail
                losses = (out / "metrics.csv").read_text().splitlines()
                rows.append((label, peaks, again, secs, secs2, len(losses) - 1))
                print(f"# {label} done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print(f"{a.vision} + MiniLM, 2 processes (torchrun, gloo, CPU), fp32, batch 2 per process, "
          f"224 px; {a.steps} steps + checkpoint, then resume for 1 more")  # fmt: skip
    print("| preset | rank peaks, run (GiB) | together | rank peaks, resume (GiB) | together "
          "| run s | resume s | steps logged |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for label, peaks, again, secs, secs2, n in rows:
        p = " / ".join(f"{v / GIB:.2f}" for v in peaks)
        q = " / ".join(f"{v / GIB:.2f}" for v in again)
        print(f"| {label} | {p} | {sum(peaks) / GIB:.2f} | {q} | {sum(again) / GIB:.2f} "
              f"| {secs:.0f} | {secs2:.0f} | {n} |")  # fmt: skip
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
