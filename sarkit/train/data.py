"""Records -> grayscale tiles -> augmented tensors, for pretraining, SCIO and fine-tuning.

A record needs ``path`` (GeoTIFF, JPEG or PNG; relative paths are looked up beside the
record file first, then from the working directory) and, for image-text training,
``texts``. Augmentation fits SAR: random crops, flips and 90-degree rotations, never colour
jitter (amplitude statistics carry meaning). Every random choice is drawn from a generator
seeded by (seed, epoch, index), so a sample looks the same whichever worker loads it and a
resumed run sees exactly the images an uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sarkit.errors import SarkitError


def resolve_path(path: str, base: Path | None) -> Path:
    """A tile path: absolute, beside the record file, or from the working directory."""
    p = Path(path)
    if p.is_absolute():
        return p
    if base is not None and (base / p).exists():
        return base / p
    return p


def read_gray(path: Path) -> np.ndarray:
    """One band as float32 in [0, 1]: the same pixels the filter and the LLM see.

    ``sarkit.raster.tileread`` is the one reader of every stage (8-bit tiles as they are,
    other types by slice's log-percentile stretch fitted on the tile, 0 = nodata).
    """
    from sarkit.raster.tileread import read_f32

    return read_f32(path)


@dataclass
class Augment:
    """SAR-fit augmentation: crop scale range, flips, 90-degree turns."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    flips: bool = True
    rot90: bool = True


def to_tensor(
    arr: np.ndarray,
    size: int,
    augment: Augment | None,
    rng: np.random.Generator | None,
    mean: float = 0.5,
    std: float = 0.5,
) -> torch.Tensor:
    """Crop (when augmenting), resize to size x size, flip/rotate; (x - mean) / std."""
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    h, w = arr.shape
    if augment is not None and rng is not None:
        scale = rng.uniform(*augment.crop_scale)
        ch = max(1, int(round(h * math.sqrt(scale))))
        cw = max(1, int(round(w * math.sqrt(scale))))
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        x = x[..., top : top + ch, left : left + cw]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if augment is not None and rng is not None:
        if augment.flips and rng.random() < 0.5:
            x = x.flip(-1)
        if augment.flips and rng.random() < 0.5:
            x = x.flip(-2)
        if augment.rot90:
            x = torch.rot90(x, int(rng.integers(0, 4)), dims=(-2, -1))
    return ((x[0] - mean) / std).contiguous()


class TileImages:
    """Tile reading shared by the pretraining pairs and the tasks' tile datasets: a subclass
    gives ``read(i)``, ``__len__`` and the crop, augmentation and normalisation attributes."""

    def __init__(
        self,
        image_size: int,
        base: Path | None = None,
        augment: Augment | None = None,
        seed: int = 0,
        mean: float = 0.5,
        std: float = 0.5,
        center_crop: float = 1.0,
    ):
        self.image_size = int(image_size)
        self.base = base
        self.augment = augment
        self.seed = int(seed)
        self.mean, self.std = float(mean), float(std)
        self.center_crop = float(center_crop)  # side fraction kept (MSTAR practice: 88/128)
        self.epoch = 0
        self.bad: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def readable(self, index: int) -> tuple[np.ndarray, int]:
        """The tile of `index`, or of the next readable record when it cannot be read.

        A bad tile found mid-run is named on stderr once (per worker) and replaced by the next
        record in the dataset, so every batch keeps its size (ranks all-gather equal batches)
        and the run goes on; the text travels with the image that replaced it.
        """
        n = len(self)
        for k in range(n):
            i = (index + k) % n
            try:
                return self.read(i), i
            except SarkitError as exc:
                if i not in self.bad:
                    self.bad.add(i)
                    from sarkit import log

                    log.warn(f"skipped: {exc}")
        raise SarkitError("no tile of the records can be read")

    def image(self, index: int) -> tuple[torch.Tensor, int]:
        """(the augmented, normalised tile of `index` or its replacement, its index)."""
        arr, index = self.readable(index)
        if self.center_crop < 1.0:
            h, w = arr.shape
            ch, cw = max(1, round(h * self.center_crop)), max(1, round(w * self.center_crop))
            top, left = (h - ch) // 2, (w - cw) // 2
            arr = arr[top : top + ch, left : left + cw]
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.augment else None
        return to_tensor(arr, self.image_size, self.augment, rng, self.mean, self.std), index


class TileDataset(TileImages, torch.utils.data.Dataset):
    """Records -> (image, record index); the collate function adds what a task needs."""

    def __init__(
        self,
        records: Sequence[dict],
        image_size: int,
        base: Path | None = None,
        augment: Augment | None = None,
        seed: int = 0,
        mean: float = 0.5,
        std: float = 0.5,
        center_crop: float = 1.0,
    ):
        super().__init__(image_size, base, augment, seed, mean, std, center_crop)
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int) -> np.ndarray:
        rec = self.records[index]
        path = resolve_path(str(rec["path"]), self.base)
        try:
            return read_gray(path)
        except SarkitError as exc:
            raise SarkitError(f"record {rec.get('id')}: {exc}") from None
        except Exception as exc:
            raise SarkitError(f"{path} (record {rec.get('id')}): unreadable tile: {exc}") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.image(index)


def pixel_stats(
    records: Sequence[dict], base: Path | None = None, n: int = 256, seed: int = 0
) -> tuple[float, float]:
    """Mean and standard deviation of [0, 1] pixels over a fixed sample of `n` tiles."""
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(records))[:n] if len(records) > n else range(len(records))
    means, variances = [], []
    for i in pick:
        try:
            arr = read_gray(resolve_path(str(records[int(i)]["path"]), base))
        except Exception:  # named when the dataset meets it; statistics need only some tiles
            continue
        means.append(float(arr.mean()))
        variances.append(float(arr.var()))
    if not means:
        raise SarkitError(
            f"none of {len(pick)} sampled tiles can be read (first: "
            f"{records[int(list(pick)[0])].get('path')})"
        )
    mean = float(np.mean(means))
    std = float(np.sqrt(np.mean(variances) + np.var(means)))
    return mean, max(std, 1e-3)


class ImageTextCollate:
    """Stack images and tokenise the records' texts (segment order = codec fields).

    A record may name segments to keep out of MLM targets in ``mlm_exclude`` (field names,
    as SCIO's noise pool does); those tokens are never masked or predicted. Records with the
    same ``group`` describe the same thing (BLIP's ``idx``): ITC counts them as positives
    and ITM draws no hard negative among them.
    """

    def __init__(self, records: Sequence[dict], codec: Any):
        self.records = records
        self.codec = codec
        names = sorted({str(r["group"]) for r in records if r.get("group") is not None})
        self.group_ids = {name: i for i, name in enumerate(names)}

    def group(self, index: int) -> int:
        """A record's ``group`` as an integer; a record without one is a group of its own."""
        name = self.records[index].get("group")
        return self.group_ids[str(name)] if name is not None else -1 - index

    def __call__(self, batch: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        images = torch.stack([b[0] for b in batch])
        index = torch.tensor([b[1] for b in batch], dtype=torch.long)
        recs = [self.records[i] for i in index.tolist()]
        enc = self.codec.encode([r["texts"] for r in recs])
        eligible = torch.ones_like(enc.attention_mask, dtype=torch.bool)
        fields = self.codec.fields
        for row, rec in enumerate(recs):
            for name in rec.get("mlm_exclude") or ():
                if name in fields:
                    eligible[row] &= enc.segment_ids[row] != fields.index(name) + 1
        return {
            "images": images,
            "input_ids": enc.input_ids,
            "attention_mask": enc.attention_mask,
            "segment_ids": enc.segment_ids,
            "mlm_eligible": eligible,
            "index": index,
            "groups": torch.tensor([self.group(i) for i in index.tolist()], dtype=torch.long),
        }


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded per-epoch permutation, from a given position on.

    Every rank gets the same number of samples (the permutation is padded by wrapping, as
    DistributedSampler does), so all-gathers see equal batches. ``start`` skips samples
    already seen when a run resumes mid-epoch, without loading them.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        keyed: bool = False,
    ):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.keyed = keyed  # yield (epoch, index) keys for an EpochKeyed dataset
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        order = (order * math.ceil(total / max(self.n, 1)))[:total]
        return order[self.rank : total : self.world]

    def __iter__(self):
        rest = self.indices()[self.start :]
        if not self.keyed:
            return iter(rest)
        epoch = self.epoch  # the keys' epoch is the one set when iteration began
        return ((epoch, i) for i in rest)  # lazily: no second list of the epoch's samples

    def __len__(self) -> int:
        return self.per_rank - self.start


class EpochKeyed(torch.utils.data.Dataset):
    """A dataset read by (epoch, index) keys, so DataLoader workers can be persistent.

    A persistent worker keeps its own copy of the dataset from the first epoch on, so an
    epoch set on the main process's copy never reaches it; augmentation is seeded by the
    epoch, so the key carries it instead (an EpochSampler with ``keyed=True`` makes them).
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]

    def __getitems__(self, keys: list[tuple[int, int]]) -> Any:
        """A batch through the dataset's own ``__getitems__`` where it has one (the
        pretraining loader builds whole batches), else item by item (DataLoader's way)."""
        inner = getattr(self.dataset, "__getitems__", None)
        if inner is None or not keys:
            return [self[k] for k in keys]
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(keys[0][0])  # a batch never spans two epochs
        return inner([i for _, i in keys])
