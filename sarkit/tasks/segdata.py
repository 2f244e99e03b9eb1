"""Segmentation data: images and masks matched by file stem, tiles, colour palettes.

A data folder holds ``images/`` and ``masks/`` (a seeded 4:1 split by image), or
``train/{images,masks}`` and ``val/{images,masks}`` (the split as given). Masks are index
PNGs (the pixel is the class) or colour PNGs mapped through ``--palette`` ("R,G,B:name;...",
in class order). ``--ignore-index K`` is a label left out of the loss and the metrics
(PolSF's 0 = unlabelled); the other labels become classes 0..n-1 in order.

A mask with another size than its image, a colour outside the palette or a label outside the
class list is skipped and counted (the first named); an image without a mask likewise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sarkit import log
from sarkit.errors import SarkitError, UsageError
from sarkit.tasks.labels import IMAGE_SUFFIXES, VAL_NAMES

IGNORE = 255  # what ignored pixels become inside the model's targets


@dataclass
class Palette:
    colours: list[tuple[int, int, int]]
    names: list[str]

    @classmethod
    def parse(cls, text: str) -> Palette:
        colours, names = [], []
        for part in text.split(";"):
            if not part.strip():
                continue
            rgb, _, name = part.partition(":")
            try:
                colour = tuple(int(v) for v in rgb.split(","))
            except ValueError:
                colour = ()
            if len(colour) != 3 or not all(0 <= v <= 255 for v in colour):
                raise UsageError(f"--palette: '{part}' is not 'R,G,B:name'")
            colours.append(colour)
            names.append(name.strip() or str(len(names)))
        if len(colours) < 2:
            raise UsageError("--palette needs at least two 'R,G,B:name' entries")
        return cls(colours, names)  # type: ignore[arg-type]


def pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of FOLDER/images and FOLDER/masks by stem."""
    images, masks = folder / "images", folder / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise SarkitError(f"{folder}: expected images/ and masks/ folders")
    by_stem = {p.stem: p for p in masks.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    out, missing = [], []
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if image.stem in by_stem:
            out.append((image, by_stem[image.stem]))
        else:
            missing.append(image)
    if missing:
        log.warn(f"{folder}: skipped {len(missing)} image(s) without a mask; first: {missing[0]}")
    if not out:
        raise SarkitError(f"{folder}: no image with a mask of the same name")
    return out


def find(data: str) -> tuple[list, list | None]:
    root = Path(data)
    if not root.is_dir():
        raise SarkitError(f"--data {data}: not a folder")
    held = next((root / n for n in VAL_NAMES if (root / n / "images").is_dir()), None)
    if (root / "train" / "images").is_dir() and held is not None:
        return pairs(root / "train"), pairs(held)
    return pairs(root), None


def read_mask(path: Path, palette: Palette | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if palette is None:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise SarkitError(
                    f"{path}: a {im.mode} colour mask; give --palette 'R,G,B:name;...'"
                )
            return np.asarray(im).astype(np.int64)
        rgb = np.asarray(im.convert("RGB")).astype(np.int64)
    code = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]
    out = np.full(code.shape, -1, np.int64)
    for index, (r, g, b) in enumerate(palette.colours):
        out[code == (r << 16 | g << 8 | b)] = index
    if (out < 0).any():
        y, x = np.argwhere(out < 0)[0]
        colour = tuple(int(v) for v in rgb[y, x])
        raise SarkitError(f"{path}: pixel ({x}, {y}) is {colour}, not in --palette")
    return out


def load_pairs(
    items: Sequence[tuple[Path, Path]],
    labels: list[int],
    palette: Palette | None,
    ignore: int | None,
    what: str,
) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """(uint8 images, uint8 class maps with IGNORE, names); bad pairs skipped and counted."""
    from sarkit.raster.tileread import read_u8

    lut = np.full(max(max(labels), ignore or 0) + 1, -1, np.int64)
    for index, label in enumerate(labels):
        lut[label] = index
    if ignore is not None:
        lut[ignore] = IGNORE
    images, masks, names, bad = [], [], [], []
    for image_path, mask_path in items:
        try:
            image = read_u8(image_path)
            raw = read_mask(mask_path, palette)
            if raw.shape != image.shape:
                raise SarkitError(
                    f"{mask_path}: {raw.shape[1]}x{raw.shape[0]} mask for a "
                    f"{image.shape[1]}x{image.shape[0]} image"
                )
            outside = (raw < 0) | (raw >= len(lut))
            mapped = np.where(outside, -1, lut[np.clip(raw, 0, len(lut) - 1)])
            if (mapped < 0).any():
                values = sorted(set(np.unique(raw[mapped < 0]).tolist()))
                raise SarkitError(f"{mask_path}: labels {values[:5]} outside the class list")
        except Exception as exc:  # a bad pair is skipped, not the run
            bad.append(str(exc))
            continue
        images.append(image)
        masks.append(mapped.astype(np.uint8))
        names.append(str(image_path))
    if bad:
        log.warn(f"{what}: skipped {len(bad)} image/mask pair(s); first: {bad[0]}")
    if not images:
        raise SarkitError(f"{what}: no usable image/mask pair ({bad[0]})")
    return images, masks, names


def class_labels(items, palette: Palette | None, ignore: int | None, n: int | None) -> list[int]:
    """The label values that are classes: the palette's, 0..n-1, or those found in masks."""
    if palette is not None:
        found = range(len(palette.colours))
    elif n is not None:
        found = range(n)
    else:
        seen: set[int] = set()
        first_error = None
        for _, mask_path in items:
            try:
                seen |= set(np.unique(read_mask(mask_path, None)).tolist())
            except Exception as exc:  # named when the pair is loaded
                first_error = first_error or exc
        if not seen and first_error is not None:
            raise SarkitError(str(first_error))
        found = range(max(seen) + 1) if seen else range(0)
    return [v for v in found if v != ignore]


RARE_SAMPLE = 4096  # pixels kept per minority class and image to centre windows on


class TileDataset(torch.utils.data.Dataset):
    """Random TILE x TILE crops of the cached images (flipped at random), resized to
    ``size`` (masks by nearest neighbour); an epoch draws as many tiles as cover the images.
    ``rare`` of the windows are centred (up to the image edge) on a pixel of a class other
    than the image's most common one, the class drawn at even odds among those it holds:
    ships are 0.13 % of HRSID's pixels, so random windows rarely show one."""

    def __init__(self, images, masks, tile: int, size: int, mean: float, std: float, seed: int,
                 rare: float = 0.0):  # fmt: skip
        self.images, self.masks = images, masks
        self.tile, self.size, self.mean, self.std, self.seed = tile, size, mean, std, seed
        h, w = images[0].shape
        self.per_image = math.ceil(h / min(tile, h)) * math.ceil(w / min(tile, w))
        self.epoch = 0
        self.rare = float(rare)
        self.minority = [_minority_pixels(m, seed) for m in masks] if rare > 0 else []

    def __len__(self) -> int:
        return len(self.images) * self.per_image

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int):
        i = index % len(self.images)
        image, mask = self.images[i], self.masks[i]
        h, w = image.shape
        th, tw = min(self.tile, h), min(self.tile, w)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        top, left = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
        if self.rare and self.minority[i] and rng.random() < self.rare:
            pixels = self.minority[i][int(rng.integers(len(self.minority[i])))]
            y, x0 = divmod(int(pixels[int(rng.integers(len(pixels)))]), w)
            top = min(max(y - th // 2, 0), h - th)
            left = min(max(x0 - tw // 2, 0), w - tw)
        x = image[top : top + th, left : left + tw]
        y = mask[top : top + th, left : left + tw]
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        return to_input(x, self.size, self.mean, self.std), to_target(y, self.size)


def _minority_pixels(mask: np.ndarray, seed: int) -> list[np.ndarray]:
    """Flat indices (a seeded sample of at most RARE_SAMPLE) of each class of `mask` but its
    most common one, ignored pixels left out."""
    values, counts = np.unique(mask[mask != IGNORE], return_counts=True)
    if len(values) < 2:
        return []
    rng = np.random.default_rng([seed, int(mask.size)])
    out = []
    for v in values[np.argsort(-counts)][1:]:
        where = np.flatnonzero(mask == v).astype(np.int64)
        if len(where) > RARE_SAMPLE:
            where = rng.choice(where, RARE_SAMPLE, replace=False)
        out.append(where)
    return out


def to_input(x: np.ndarray, size: int, mean: float, std: float) -> torch.Tensor:
    t = torch.from_numpy(np.array(x)).float().div_(255.0)[None, None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)
    return ((t[0] - mean) / std).contiguous()


def to_target(y: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.array(y)).long()[None, None].float()
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="nearest")
    return t[0, 0].long()


def collate(batch):
    return {
        "images": torch.stack([b[0] for b in batch]),
        "masks": torch.stack([b[1] for b in batch]),
    }


def windows(length: int, tile: int, stride: int | None = None) -> list[int]:
    """Tile starts covering 0..length, `stride` apart (default: `tile`, no overlap), the
    last one flush with the end."""
    if tile >= length:
        return [0]
    starts = list(range(0, length - tile + 1, stride or tile))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts
