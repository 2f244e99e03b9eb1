"""Benchmark the fine-tuning heads: training images/s through the shared loop against a bare
forward/backward loop of the same model, and evaluation images/s.

    .venv/bin/python bench/finetune.py [--tasks classify,segment,detect] [--steps 20] [--repeat 3]

For each head the real data of ../shared/data is prepared by the head itself (MSTAR chips for
classify, PolSF tiles for segment, HRSID ships for detect: boxes from its masks through
`finetune build --boxes-from-masks`, Faster R-CNN on the ViTDet pyramid), then, in this one
process and with the same seed:
  bare   batches collated beforehand and kept in memory; forward, backward, fused AdamW step
  loop   sarkit.train.loop.Loop over the head's dataset (DataLoader, augmentation, lr
         schedule, logging, CSV, TensorBoard; evaluation switched off), images/s from its
         per-step timings in metrics.csv (the first 2 steps are warm-up)
Overhead = bare / loop - 1 (target <= 10 %). Rounds alternate (--repeat): the table gives
the median of the rounds' own ratios (each round's two halves ran back to back) and their
range, which shows how far the machine's noise reaches. eval img/s: the held-out
pass the head runs each epoch (classify: batched softmax; segment: tiled whole images;
detect: detections of whole images, without the pycocotools scoring).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SARKIT_SHARED_DATA", REPO.parent / "shared" / "data"))

SETUPS = {
    # task: data, extra head options, image size, batch
    "classify": ("mstar", {"center_crop": 0.6875, "pool": "mean", "label_smoothing": 0.1}, 64, 32),
    "segment": ("polsf_airsar", {"ignore_index": 0, "tile": 128, "decoder_layers": 2}, 64, 8),
    "detect": ("hrsid_mini", {"head": "faster_rcnn", "fpn_channels": 64}, 128, 4),
}


def data_path(task: str, tmp: Path) -> str:
    """The head's --data: the shared folder, or for detect the COCO boxes built from it."""
    data = SHARED / SETUPS[task][0]
    if task != "detect":
        return str(data)
    from sarkit.tasks.boxes import build_coco

    out = tmp / "hrsid.coco.json"
    if not out.exists():
        build_coco(data, out)
    return str(out)


def options(task: str, out: Path, steps: int, workers: int = 2):
    from sarkit.tasks import registry
    from sarkit.tasks.options import FinetuneOptions

    _, extra, size, batch = SETUPS[task]
    head = registry.head(task)
    fields = {k: v for k, v in head.defaults.items() if k in FinetuneOptions.__dataclass_fields__}
    fields.update(image_size=size, batch_size=batch, max_steps=steps, workers=workers, log_every=1,
                  save_every=10**9, warmup_steps=2)  # fmt: skip
    return head, FinetuneOptions(output=out, task=task, data=data_path(task, out.parent),
                                 extra=dict(extra), **fields)  # fmt: skip


def bare(prepared, steps: int, batch: int) -> float:
    from sarkit.train.engine import adamw

    model = prepared.task.model
    model.train()
    loader = torch.utils.data.DataLoader(prepared.dataset, batch_size=batch,
                                         collate_fn=prepared.collate, shuffle=True)  # fmt: skip
    batches = []
    for b in loader:
        batches.append(b)
        if len(batches) == steps:
            break
    opt = adamw(prepared.task.param_groups(0.05), 1e-4)
    times = []
    for b in batches:
        t = time.perf_counter()
        out = model(**b)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times[2:])


def looped(prepared, opts) -> float:
    from sarkit.train.loop import Loop

    prepared.task.measure = None  # training speed only
    Loop(prepared.task, prepared.dataset, prepared.collate, opts).fit()
    with open(Path(opts.output) / "metrics.csv", newline="") as fh:
        rates = [float(r["samples_s"]) for r in csv.DictReader(fh)][2:]
    return statistics.median(rates)


def eval_rate(task: str, prepared, opts) -> float:
    """Held-out images/s of the head's own evaluation pass."""
    model = prepared.task.model.eval()
    if task == "classify":
        from sarkit.tasks.classify import predict

        held = prepared.dataset  # the same chips, centre crop
        held.train = False
        n = min(len(held), 512)
        subset = torch.utils.data.Subset(held, range(n))
        t = time.perf_counter()
        predict(model, subset, 128)
        return n / (time.perf_counter() - t)
    if task == "detect":
        from sarkit.tasks.detdata import BoxDataset
        from sarkit.tasks.detect import predict

        ds = prepared.dataset
        held = BoxDataset(ds.cached[:16], ds.size, ds.mean, ds.std, train=False)
        t = time.perf_counter()
        predict(model, held, 8)
        return len(held) / (time.perf_counter() - t)
    from sarkit.tasks.segment import predict_image

    ds = prepared.dataset
    t = time.perf_counter()
    for image in ds.images[:16]:
        predict_image(model, image, ds.tile, ds.size, ds.mean, ds.std)
    return 16 / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default="classify,segment,detect")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=2, help="the loop's DataLoader workers (0: in-process)"
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for task in args.tasks.split(","):
        b, lp, ev = [], [], []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                head, opts = options(task, Path(tmp) / "run", args.steps, args.workers)
                torch.manual_seed(0)
                b.append(bare(head.prepare(opts), args.steps, opts.batch_size))
                torch.manual_seed(0)
                prepared = head.prepare(opts)
                lp.append(looped(prepared, opts))
                ev.append(eval_rate(task, prepared, opts))
        rb, rl = statistics.median(b), statistics.median(lp)
        # paired: each round's bare and loop ran back to back, so their ratio is freer of the
        # machine's drift between rounds than the ratio of the two medians
        over = [x / y - 1 for x, y in zip(b, lp, strict=True)]
        rows.append((task, rb, rl, statistics.median(over), min(over), max(over),
                     statistics.median(ev)))  # fmt: skip
    load = os.getloadavg()[0]
    print(f"\nload average {load:.2f}, {torch.get_num_threads()} threads, {args.steps} steps, "
          f"{args.workers} loader workers, {args.repeat} rounds")  # fmt: skip
    print("| task | bare img/s | loop img/s | loop overhead (median of rounds) | rounds' range "
          "| eval img/s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for task, rb, rl, over, lo, hi, ev in rows:
        print(f"| {task} | {rb:.1f} | {rl:.1f} | {100 * over:+.1f} % | {100 * lo:+.1f} to "
              f"{100 * hi:+.1f} % | {ev:.1f} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
