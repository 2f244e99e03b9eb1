"""Benchmark `sarkit pretrain`: samples/s of the tiny and base configs, trainer overhead.

    .venv/bin/python bench/pretrain.py [--configs tiny,base] [--steps 8] [--workers 2]

Both loops train the same model (same seed) on the same batches in this one process:
  bare     a hand-written loop over batches collated beforehand and kept in memory:
           momentum update, forward (ITC + ITM + MLM), backward, fused AdamW step.
  trainer  sarkit's Trainer on the same records (real MSTAR chips from ../shared/data,
           read and augmented by DataLoader workers, lr schedule, logging, CSV,
           TensorBoard); samples/s from its per-step timings (startup and export excluded).
Overhead = bare samples/s / trainer samples/s - 1 (target <= 10%). The first 2 steps of
each loop are warm-up and not counted. Load average is printed: on a shared machine the
figures move with it.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SARKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "tests"))

CONFIGS = {
    # name: vision, image size, text layers (None = all 6 of MiniLM), max tokens, batch
    "tiny": ("vit_tiny_patch16_224", 224, None, 128, 16),
    "base": ("vit_base_patch16_224", 224, None, 128, 8),
}


def records(n: int) -> list[dict]:
    from test_pretrain_data import mstar_records

    recs = mstar_records(SHARED / "mstar", "train", None)
    return recs[:n]


def options(name: str, out: Path, steps: int, workers: int):
    from sarkit.train.options import PretrainOptions

    vision, size, layers, tokens, batch = CONFIGS[name]
    return PretrainOptions(
        output=out, vision=vision, image_size=size, text_layers=layers, max_tokens=tokens,
        batch_size=batch, epochs=1, max_steps=steps, log_every=1, save_every=0,
        workers=workers, queue_size=20000, warmup_steps=3000,
    )  # fmt: skip


def bare(recs: list[dict], opts) -> list[float]:
    """samples/s per step of the plain loop."""
    from sarkit.model.knowlip import KnowLIP, Momentum
    from sarkit.model.text import TextCodec
    from sarkit.train.data import Augment, ImageTextCollate, TileDataset
    from sarkit.train.engine import adamw, param_groups
    from sarkit.train.trainer import choose_fields, model_config

    torch.manual_seed(opts.seed)
    fields = choose_fields(recs, None)
    model = KnowLIP(model_config(opts, fields))
    momentum = Momentum(model, opts.queue_size, opts.momentum)
    momentum.copy_from(model)
    optimizer = adamw(param_groups(model, opts.weight_decay), 1e-4)
    codec = TextCodec.from_pretrained(None, fields, opts.max_tokens)
    ds = TileDataset(recs, opts.image_size, augment=Augment(), seed=opts.seed)
    collate = ImageTextCollate(recs, codec)
    b = opts.batch_size
    batches = [collate([ds[i] for i in range(k * b, (k + 1) * b)]) for k in range(opts.max_steps)]
    tok = codec.tokenizer
    special = [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id]
    rates = []
    for batch in batches:
        t = time.perf_counter()
        momentum.update(model)
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"], momentum, 0.4,
                    batch["mlm_eligible"], special, tok.mask_token_id)  # fmt: skip
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(out["loss"].item())
        rates.append(b / (time.perf_counter() - t))
    return rates


def trainer(recs: list[dict], opts) -> list[float]:
    from sarkit.train.trainer import pretrain

    pretrain(recs, opts)
    with open(Path(opts.output) / "metrics.csv", newline="") as fh:
        return [float(r["samples_s"]) for r in csv.DictReader(fh)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="tiny,base")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from sarkit import log

    log.configure(quiet=True)
    random.seed(0)
    rows = []
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            opts = options(name, Path(tmp) / "run", args.steps, args.workers)
            recs = records(opts.batch_size * args.steps)
            r_bare = statistics.median(bare(recs, opts)[2:])
            r_trainer = statistics.median(trainer(recs, opts)[2:])
        rows.append((name, opts.batch_size, r_bare, r_trainer, r_bare / r_trainer - 1))
        print(f"# {name} done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32, "
          f"image 224, max tokens 128, {args.steps} steps (median of steps 3..)")  # fmt: skip
    print("| config | batch | bare samples/s | trainer samples/s | trainer overhead |")
    print("|---|---|---|---|---|")
    for name, batch, rb, rt, over in rows:
        print(f"| {name} | {batch} | {rb:.2f} | {rt:.2f} | {over * 100:+.1f}% |")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
