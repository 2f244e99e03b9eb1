"""MSTAR's 15-degree test chips are darker than its 17-degree training chips: is brightness a
class cue a classifier learns, and do `--gain-jitter` / `--chip-norm` remove it?

Prints two tables. The first needs no labels and no training: each split's mean pixel
and the mean of the chips' medians (the clutter level), and the test/train ratio. The
second (``--epochs N``, N > 0) trains the small all-convolutional CNN of FACTS.md
(A-ConvNets style, 0.3 M parameters, 88 x 88 views) on sarkit's own ChipDataset views
(the same crop, flip, gain jitter and chip norm `finetune classify` uses) once per
normalisation, one seed each, and reports top-1 on the test split per epoch, settled (the
mean of the last 5 epochs) and its difference from the plain dataset-normalised baseline
run in the same script.

    python bench/mstar_brightness.py                       # the label-free table only
    OMP_NUM_THREADS=1 python bench/mstar_brightness.py --epochs 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sarkit.tasks import labels as labelled  # noqa: E402
from sarkit.tasks.images import ChipDataset, chip_scale, collate, read_all, stats  # noqa: E402

DATA = Path(os.environ.get("SARKIT_SHARED_DATA", ROOT.parent / "shared" / "data")) / "mstar"
CROP = 88 / 128


def load() -> tuple[tuple[list, list], tuple[list, list]]:
    """(images, labels) of train and test, read as `finetune classify` reads them."""
    data = labelled.load(str(DATA))
    index = {c: i for i, c in enumerate(data.classes)}
    out = []
    for what, items in (("train", data.train), ("test", data.val)):
        images, labels, _ = read_all([(p, index[c]) for p, c in items], f"{DATA} ({what})")
        out.append((images, labels))
    return out[0], out[1]


def cnn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 6), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5),
        nn.Conv2d(64, 128, 5), nn.ReLU(), nn.Conv2d(128, classes, 3), nn.Flatten(),
    )  # fmt: skip


def train_once(arm: str, train, test, epochs: int, seed: int) -> list[float]:
    gain, norm = {"dataset": (0.0, False), "gain 0.3": (0.3, False), "chip norm": (0.0, True)}[arm]
    mean, std = (1.0, 1.0) if norm else stats(train[0])
    views = ChipDataset(
        *train, 88, CROP, mean, std, train=True, seed=seed, gain=gain, chip_norm=norm
    )
    held = ChipDataset(*test, 88, CROP, mean, std, train=False, chip_norm=norm)
    torch.manual_seed(seed)
    model = cnn(10)
    steps = epochs * (len(views) // 32)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        views, 32, shuffle=True, drop_last=True, collate_fn=collate, generator=gen
    )
    test_loader = torch.utils.data.DataLoader(held, 256, collate_fn=collate)
    ys = np.asarray(test[1])
    top1 = []
    for epoch in range(epochs):
        views.set_epoch(epoch)
        model.train()
        for batch in loader:
            loss = nn.functional.cross_entropy(
                model(batch["images"]), batch["labels"], label_smoothing=0.1
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(b["images"]).argmax(1) for b in test_loader]).numpy()
        top1.append(float((pred == ys).mean()))
        print(f"  {arm}: epoch {epoch + 1} top-1 {100 * top1[-1]:.1f} %", flush=True)
    return top1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=0, help="CNN epochs per arm (0: stats only)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"MSTAR not found at {DATA} (set SARKIT_SHARED_DATA)")
    train, test = load()
    print("| split | chips | mean pixel | mean chip median | test / train (median) |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for name, (images, _) in (("train (17 deg)", train), ("test (15 deg)", test)):
        mean = float(np.mean([im.mean() for im in images]))
        med = float(np.mean([255.0 / chip_scale(im) for im in images]))
        base = base or med
        print(f"| {name} | {len(images)} | {mean:.2f} | {med:.2f} | {med / base:.3f} |")
    if args.epochs <= 0:
        return
    print()
    rows = []
    for arm in ("dataset", "gain 0.3", "chip norm"):
        t0 = time.process_time()
        top1 = train_once(arm, train, test, args.epochs, args.seed)
        rows.append((arm, top1, time.process_time() - t0))
    print(f"\nSmall CNN, {args.epochs} epochs, seed {args.seed}, top-1 on the 15-deg test split")
    print("| normalisation | last | settled (mean of last 5) | vs dataset | CPU s |")
    print("|---|---:|---:|---:|---:|")
    ref = float(np.mean(rows[0][1][-5:]))
    for arm, top1, cpu in rows:
        settled = float(np.mean(top1[-5:]))
        print(
            f"| {arm} | {100 * top1[-1]:.1f} % | {100 * settled:.1f} % | "
            f"{100 * (settled - ref):+.1f} | {cpu:.0f} |"
        )


if __name__ == "__main__":
    main()
