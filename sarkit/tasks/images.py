"""Labelled images read once through the one tile reader, kept as uint8 in memory.

A fine-tune reads each image every epoch: decoding MSTAR's 5,000 JPEG chips once (a few
seconds) keeps the CPU for the model. An image that cannot be read is skipped and counted
(the first one named on stderr); none readable is an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sarkit import log
from sarkit.errors import SarkitError


def read_all(
    items: Sequence[tuple[Path, int]], what: str
) -> tuple[list[np.ndarray], list[int], list[str]]:
    """(uint8 images, labels, names) of the readable items; the others counted."""
    from sarkit.raster.tileread import read_u8

    images, labels, names, bad = [], [], [], []
    for path, label in items:
        try:
            images.append(read_u8(path))
        except Exception as exc:  # TileReadError, OSError: the tile is bad, not the run
            bad.append(f"{path}: {exc}")
            continue
        labels.append(int(label))
        names.append(str(path))
    if bad:
        log.warn(f"{what}: skipped {len(bad)} unreadable image(s); first: {bad[0]}")
    if not images:
        raise SarkitError(f"{what}: no readable image ({bad[0] if bad else 'none given'})")
    return images, labels, names


def stats(images: Sequence[np.ndarray], n: int = 512) -> tuple[float, float]:
    """Mean and std of [0, 1] pixels over the first `n` images."""
    sample = [im.astype(np.float32) / 255.0 for im in images[:n]]
    mean = float(np.mean([s.mean() for s in sample]))
    var = float(np.mean([s.var() for s in sample]) + np.var([s.mean() for s in sample]))
    return mean, max(math.sqrt(var), 1e-3)


def chip_scale(image: np.ndarray) -> float:
    """The factor that puts a uint8 chip's median at 1 (a median of 0, an all-dark chip,
    counts as 1 grey level, so nothing divides by zero)."""
    return 255.0 / max(float(np.median(image)), 1.0)


class ChipDataset(torch.utils.data.Dataset):
    """(image tensor, label) from cached chips: a square crop (``crop`` x the short side,
    centred for evaluation, anywhere in the chip when training: a translation augment),
    resized to ``size``, a random horizontal flip when training, then (x - mean) / std.
    ``stretch`` s > 0 also stretches each training view along the rows (range, in MSTAR's
    chips) by a factor drawn from [1 - s, 1 + s]: the window keeps ``side / factor`` rows
    (as many as the chip has at most). A target seen at another depression angle casts a
    shadow of another length along range (tan 17 / tan 15 = 1.14 between MSTAR's train and
    test angles); the columns (azimuth) keep their scale. ``gain`` g > 0 multiplies each
    training view's pixels by a factor drawn from [1 - g, 1 + g]: two collections of the
    same targets differ in overall brightness (MSTAR's 15-degree chips are 12-13 % darker
    than its 17-degree ones), and a model that reads brightness as a class cue fails there.
    ``chip_norm`` divides each chip by its own median (its clutter level) before anything
    else, for every view, training and evaluation alike: the same fix for brightness as a
    deterministic normalisation rather than an augment (then pass mean 1, std 1).
    Random choices come from (seed, epoch, index), so a resumed run sees the same views."""

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[int],
        size: int,
        crop: float,
        mean: float,
        std: float,
        train: bool,
        seed: int = 0,
        stretch: float = 0.0,
        gain: float = 0.0,
        chip_norm: bool = False,
    ):
        if not 0.0 <= stretch < 1.0:
            raise ValueError(f"a range stretch is in [0, 1), not {stretch}")
        if not 0.0 <= gain < 1.0:
            raise ValueError(f"a gain jitter is in [0, 1), not {gain}")
        self.images, self.labels = list(images), list(labels)
        self.size, self.crop, self.mean, self.std = size, crop, mean, std
        self.stretch, self.gain = stretch, gain
        self.scales = [chip_scale(im) for im in self.images] if chip_norm else None
        self.train, self.seed, self.epoch = train, seed, 0

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        im = self.images[index]
        h, w = im.shape
        side = max(1, round(min(h, w) * self.crop))
        rows = side
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if self.stretch:  # drawn first: a stretch of 0 leaves the other draws as they were
                factor = 1.0 + self.stretch * (2.0 * float(rng.random()) - 1.0)
                rows = min(h, max(1, round(side / factor)))
            top = int(rng.integers(0, h - rows + 1))
            left = int(rng.integers(0, w - side + 1))
            flip = bool(rng.random() < 0.5)
            scale = 1.0 + self.gain * (2.0 * float(rng.random()) - 1.0) if self.gain else 1.0
        else:
            top, left, flip, scale = (h - side) // 2, (w - side) // 2, False, 1.0
        x = torch.from_numpy(np.array(im[top : top + rows, left : left + side]))
        x = x.float().div_(255.0)[None, None]
        if self.scales is not None:
            scale *= self.scales[index]
        if scale != 1.0:
            x.mul_(scale)
        if rows != self.size or side != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        if flip:
            x = x.flip(-1)
        return ((x[0] - self.mean) / self.std).contiguous(), self.labels[index]


def collate(batch: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    return {
        "images": torch.stack([b[0] for b in batch]),
        "labels": torch.tensor([b[1] for b in batch], dtype=torch.long),
    }
