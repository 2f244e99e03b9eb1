"""Detection data: COCO JSON or a Pascal VOC folder, read into one shape, images cached.

* COCO JSON (as ``sarkit finetune build --boxes-from-masks`` writes it): ``images`` with
  ``file_name`` relative to the JSON's folder, ``annotations`` with ``bbox`` [x, y, w, h] and
  ``category_id``, ``categories``. ``iscrowd`` boxes are left out of training and ignored by
  the metric (as COCO does). No split is given: a seeded 4:1 split by image.
* A VOC folder: ``Annotations/*.xml``, images in ``JPEGImages/`` or ``images/``, and the
  split from ``ImageSets/Main/{train,trainval}.txt`` + ``{val,test}.txt`` when present.
  ``<difficult>1`` objects are ignored by the metric, as VOC does. VOC's 1-based inclusive
  pixel boxes become [xmin - 1, ymin - 1, xmax, ymax].

An image whose boxes cannot all be trusted is skipped whole (its good boxes alone would turn
detections of the bad ones into false alarms): a missing or unreadable file, a box with zero
area, a box outside the image (more than 1 px: less is clipped), a category id not in the
list, a declared size other than the file's. Skipped images are counted and the first named;
a file that is not COCO JSON or VOC XML at all is an error naming it.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sarkit import log
from sarkit.errors import SarkitError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
TOLERANCE = 1.0  # pixels a box may pass the image edge (rounding) before it is an error


@dataclass
class Item:
    """One annotated image: boxes [x0, y0, x1, y1] in its own pixels, labels 1..K."""

    name: str
    path: Path
    width: int | None  # as declared by the annotation (None: take the file's)
    height: int | None
    boxes: np.ndarray  # (N, 4) float32
    labels: np.ndarray  # (N,) int64, 1..K (0 is the detectors' background)
    crowd: np.ndarray  # (N,) bool: ignored by the metric, left out of training


@dataclass
class DetData:
    items: list[Item]
    categories: list[str]  # label k is categories[k - 1]
    source: str
    kind: str  # "coco" or "voc"
    split: tuple[list[str], list[str], str] | None = None  # names (train, held out, how)
    skipped: list[str] = field(default_factory=list)


def _check_box(box: list[float], w: int | None, h: int | None, where: str) -> list[float]:
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box) or x1 <= x0 or y1 <= y0:
        raise SarkitError(f"{where}: box {_fmt(box)} has zero area")
    if w is not None and h is not None:
        if x0 < -TOLERANCE or y0 < -TOLERANCE or x1 > w + TOLERANCE or y1 > h + TOLERANCE:
            raise SarkitError(f"{where}: box {_fmt(box)} lies outside the {w}x{h} image")
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))
        if x1 <= x0 or y1 <= y0:
            raise SarkitError(f"{where}: box {_fmt(box)} has zero area inside the image")
    return [x0, y0, x1, y1]


def _fmt(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _item(name, path, w, h, boxes, labels, crowd) -> Item:
    return Item(
        name,
        path,
        w,
        h,
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(labels, np.int64),
        np.asarray(crowd, bool),
    )


# ---------------------------------------------------------------- COCO


def read_coco(path: Path, categories: list[str] | None = None) -> DetData:
    """A COCO JSON file; `categories` (a run's classes) fixes the label order by name."""
    try:
        data = json.loads(Path(path).read_text())
        cats = [(int(c["id"]), str(c["name"])) for c in data["categories"]]
        entries = list(data["images"])
        anns = list(data.get("annotations") or [])
    except FileNotFoundError:
        raise SarkitError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SarkitError(
            f"{path}: not a COCO annotation file ({type(exc).__name__}: {exc})"
        ) from None
    if not cats:
        raise SarkitError(f"{path}: no categories")
    names = [n for _, n in cats] if categories is None else list(categories)
    label_of: dict[int, int] = {}
    for cid, name in cats:
        if name in names:
            label_of[cid] = names.index(name) + 1
    base = Path(path).resolve().parent  # absolute: the run's split names files from any cwd
    by_id: dict[int, dict] = {}
    for k, entry in enumerate(entries):
        try:
            iid, file_name = int(entry["id"]), str(entry["file_name"])
        except (KeyError, TypeError, ValueError):
            raise SarkitError(f"{path}: image entry {k} has no id or file_name") from None
        if iid in by_id:
            raise SarkitError(f"{path}: image id {iid} appears twice")
        by_id[iid] = {"entry": entry, "file": file_name, "boxes": [], "labels": [], "crowd": [],
                      "error": None}  # fmt: skip
    orphans = 0
    unknown_names: set[str] = set()
    cat_name = dict(cats)
    for k, ann in enumerate(anns):
        try:
            iid, cid = int(ann["image_id"]), int(ann["category_id"])
            x, y, bw, bh = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            raise SarkitError(
                f"{path}: annotation {ann.get('id', k) if isinstance(ann, dict) else k} "
                "lacks image_id, category_id or a 4-number bbox"
            ) from None
        image = by_id.get(iid)
        if image is None:
            orphans += 1
            continue
        if image["error"]:
            continue
        where = f"{path}: annotation {ann.get('id', k)} ({image['file']})"
        if cid not in cat_name:
            image["error"] = f"{where}: category id {cid} is not in the categories list"
            continue
        if cid not in label_of:
            unknown_names.add(cat_name[cid])
            continue
        entry = image["entry"]
        w, h = entry.get("width"), entry.get("height")
        try:
            box = _check_box([x, y, x + bw, y + bh], w and int(w), h and int(h), where)
        except SarkitError as exc:
            image["error"] = str(exc)
            continue
        image["boxes"].append(box)
        image["labels"].append(label_of[cid])
        image["crowd"].append(bool(ann.get("iscrowd", 0)))
    if unknown_names:
        raise SarkitError(
            f"{path}: categories {sorted(unknown_names)} are not among the run's "
            f"{len(names)} ({', '.join(names)})"
        )
    if orphans:
        log.warn(f"{path}: {orphans} annotation(s) refer to no image entry (left out)")
    items, skipped = [], []
    for image in by_id.values():
        file = base / image["file"]
        if image["error"]:
            skipped.append(image["error"])
            continue
        if not file.is_file():
            skipped.append(f"{path}: image {image['file']}: no such file under {base}")
            continue
        entry = image["entry"]
        w, h = entry.get("width"), entry.get("height")
        items.append(_item(Path(image["file"]).stem, file, w and int(w), h and int(h),
                           image["boxes"], image["labels"], image["crowd"]))  # fmt: skip
    return DetData(items, names, str(path), "coco", None, skipped)


# ---------------------------------------------------------------- VOC


def _voc_images(root: Path) -> Path:
    for name in ("JPEGImages", "images"):
        if (root / name).is_dir():
            return root / name
    raise SarkitError(f"{root}: a VOC folder needs JPEGImages/ or images/ beside Annotations/")


def _find_image(folder: Path, file_name: str, stem: str) -> Path | None:
    if file_name and (folder / file_name).is_file():
        return folder / file_name
    for suffix in IMAGE_SUFFIXES:
        for cand in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if cand.is_file():
                return cand
    return None


def _voc_split(root: Path) -> tuple[list[str], list[str], str] | None:
    sets = root / "ImageSets" / "Main"

    def names(stem: str) -> list[str] | None:
        f = sets / f"{stem}.txt"
        if not f.is_file():
            return None
        return [ln.split()[0] for ln in f.read_text().splitlines() if ln.strip()]

    train = names("train")
    held, which = names("val"), "val"
    if train is None or held is None:  # trainval + test, the VOC2007 way
        train = train or names("trainval")
        held, which = names("test"), "test"
    if train is None or held is None:
        return None
    return train, held, f"given (ImageSets/Main {which}.txt)"


def read_voc(root: Path, categories: list[str] | None = None) -> DetData:
    """A VOC folder; classes in order of first appearance unless `categories` fixes them."""
    root = Path(root).resolve()  # absolute: the run's split names files from any cwd
    files = sorted((root / "Annotations").glob("*.xml"))
    if not files:
        raise SarkitError(f"{root}/Annotations: no .xml files")
    images = _voc_images(root)
    names = list(categories) if categories is not None else []
    parsed, skipped, unknown = [], [], set()
    for xml in files:
        try:
            tree = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as exc:
            skipped.append(f"{xml}: not readable XML ({exc})")
            continue
        file_name = (tree.findtext("filename") or "").strip()
        try:
            w = int(float(tree.findtext("size/width") or 0)) or None
            h = int(float(tree.findtext("size/height") or 0)) or None
            boxes, labels, crowd = [], [], []
            for k, obj in enumerate(tree.findall("object")):
                cat = (obj.findtext("name") or "").strip()
                where = f"{xml}: object {k} ({cat or 'no name'})"
                try:
                    x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{t}")) for t in
                                      ("xmin", "ymin", "xmax", "ymax"))  # fmt: skip
                except (TypeError, ValueError):
                    raise SarkitError(f"{where}: no complete bndbox") from None
                if not cat:
                    raise SarkitError(f"{where}: no <name>")
                box = _check_box([x0 - 1, y0 - 1, x1, y1], w, h, where)
                if cat not in names:
                    if categories is not None:
                        unknown.add(cat)
                        continue
                    names.append(cat)
                boxes.append(box)
                labels.append(names.index(cat) + 1)
                crowd.append((obj.findtext("difficult") or "0").strip() == "1")
        except (SarkitError, ValueError) as exc:
            skipped.append(str(exc))
            continue
        path = _find_image(images, file_name, xml.stem)
        if path is None:
            skipped.append(f"{xml}: image {file_name or xml.stem + '.*'}: no such file in {images}")
            continue
        parsed.append(_item(xml.stem, path, w, h, boxes, labels, crowd))
    if unknown:
        raise SarkitError(
            f"{root}: classes {sorted(unknown)} are not among the run's {len(names)} "
            f"({', '.join(names)})"
        )
    if not names:
        raise SarkitError(f"{root}: no object in any annotation")
    return DetData(parsed, names, str(root), "voc", _voc_split(root), skipped)


def load(data: str, categories: list[str] | None = None) -> DetData:
    """COCO JSON file or VOC folder, by what `data` is."""
    path = Path(data)
    if path.is_dir():
        if not (path / "Annotations").is_dir():
            raise SarkitError(f"--data {data}: a folder without Annotations/ (not a VOC folder)")
        found = read_voc(path, categories)
    elif path.is_file():
        found = read_coco(path, categories)
    else:
        raise SarkitError(f"--data {data}: no such file or folder")
    return found


# ---------------------------------------------------------------- images


@dataclass
class Cached:
    """An item with its image read once: resized to the model's square input, or with
    ``--tile`` scaled by size / tile and kept whole (windows are cut from it)."""

    item: Item
    image: torch.Tensor  # (size, size) uint8, or (H', W') when tiled
    width: int  # the file's size, the frame of item.boxes
    height: int

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes in the cached image's frame, labels) of the trained-on (non-crowd) boxes."""
        keep = ~self.item.crowd
        boxes = torch.from_numpy(self.item.boxes[keep].copy())
        boxes[:, 0::2] *= self.image.shape[1] / self.width
        boxes[:, 1::2] *= self.image.shape[0] / self.height
        return boxes, torch.from_numpy(self.item.labels[keep].copy())


def read_images(
    items: list[Item], size: int, what: str, tile: int = 0
) -> tuple[list[Cached], list[str]]:
    """Read and resize every item (``tile`` > 0: scale it by size / tile, aspect kept);
    unreadable files or a declared size other than the file's are skipped (returned as
    reasons)."""
    from sarkit.raster.tileread import read_u8

    out, bad = [], []
    for item in items:
        try:
            gray = read_u8(item.path)
        except Exception as exc:  # TileReadError, OSError: this image is bad, not the run
            bad.append(f"{item.path}: {exc}" if str(item.path) not in str(exc) else str(exc))
            continue
        h, w = gray.shape
        if (item.width, item.height) not in ((None, None), (w, h)):
            bad.append(f"{item.path}: the file is {w}x{h}, the annotation says "
                       f"{item.width}x{item.height}")  # fmt: skip
            continue
        if item.width is None and len(item.boxes):
            outside = (item.boxes[:, 2] > w + TOLERANCE) | (item.boxes[:, 3] > h + TOLERANCE)
            if outside.any():
                box = item.boxes[int(np.argmax(outside))].tolist()
                bad.append(f"{item.path}: box {_fmt(box)} lies outside the {w}x{h} image")
                continue
            item.boxes[:, 2] = np.minimum(item.boxes[:, 2], w)
            item.boxes[:, 3] = np.minimum(item.boxes[:, 3], h)
        t = torch.from_numpy(gray).float()[None, None]
        shape = (size, size)
        if tile:
            shape = (max(1, round(h * size / tile)), max(1, round(w * size / tile)))
        if (h, w) != shape:
            t = F.interpolate(t, size=shape, mode="bilinear", antialias=True)
        out.append(Cached(item, t[0, 0].round().clamp(0, 255).to(torch.uint8), w, h))
    return out, bad


def report(what: str, skipped: list[str]) -> None:
    if skipped:
        log.warn(f"{what}: skipped {len(skipped)} image(s); first: {skipped[0]}")


class BoxDataset(torch.utils.data.Dataset):
    """(normalised image, boxes in the model's frame, labels) of cached images; training
    flips at random (horizontal and vertical, from seed, epoch and index: a resumed run sees
    the same views). Crowd / difficult boxes are left out of the targets."""

    def __init__(self, cached: list[Cached], size: int, mean: float, std: float, train: bool,
                 seed: int = 0):  # fmt: skip
        self.cached, self.size, self.mean, self.std = cached, size, mean, std
        self.train, self.seed, self.epoch = train, seed, 0

    def __len__(self) -> int:
        return len(self.cached)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int):
        c = self.cached[index]
        boxes, labels = c.targets()
        x = c.image.float().div(255.0)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            x, boxes = _flips(x, boxes, rng)
        return ((x - self.mean) / self.std)[None].contiguous(), boxes, labels


def _flips(x: torch.Tensor, boxes: torch.Tensor, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical flips, each at even odds, boxes along."""
    h, w = x.shape
    if rng.random() < 0.5:
        x = x.flip(-1)
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    if rng.random() < 0.5:
        x = x.flip(-2)
        boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
    return x, boxes


def window(c: Cached, top: int, left: int, size: int) -> torch.Tensor:
    """The size x size window of a cached image at (top, left), [0, 1], zero beyond it."""
    x = torch.zeros(size, size)
    part = c.image[top : top + size, left : left + size].float().div(255.0)
    x[: part.shape[0], : part.shape[1]] = part
    return x


VISIBLE = 0.5  # a box cut by a training window is kept when this share of it is inside


class WindowDataset(torch.utils.data.Dataset):
    """Training windows of `size` (``--tile`` pixels of the scene, scaled) cut from cached
    scenes: as many per epoch as cover each scene. Ships are sparse (HRSID: 2 in an
    800 x 800 scene), so half the windows are placed around a random box of the scene and
    the other half anywhere; a box cut by the window is kept (clipped) when at least half
    of it is inside, else dropped. Flips as BoxDataset; draws from (seed, epoch, index)."""

    def __init__(self, cached: list[Cached], size: int, mean: float, std: float, seed: int = 0):
        self.cached, self.size, self.mean, self.std = cached, size, mean, std
        self.seed, self.epoch = seed, 0
        self.per_image = [
            math.ceil(c.image.shape[0] / size) * math.ceil(c.image.shape[1] / size) for c in cached
        ]
        self.index = [(i, k) for i, n in enumerate(self.per_image) for k in range(n)]

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int):
        c = self.cached[self.index[index][0]]
        boxes, labels = c.targets()
        rng = np.random.default_rng([self.seed, self.epoch, index])
        h, w = c.image.shape
        s = self.size
        if len(boxes) and rng.random() < 0.5:  # around a box: its centre anywhere inside
            x0, y0, x1, y1 = boxes[int(rng.integers(len(boxes)))].tolist()
            top = int((y0 + y1) / 2 - rng.random() * s)
            left = int((x0 + x1) / 2 - rng.random() * s)
        else:
            top = int(rng.integers(0, max(h - s, 0) + 1))
            left = int(rng.integers(0, max(w - s, 0) + 1))
        top, left = min(max(top, 0), max(h - s, 0)), min(max(left, 0), max(w - s, 0))
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        boxes = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
        boxes = boxes.clamp(min=0, max=s)
        inside = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = (inside >= VISIBLE * area) & (inside > 0)
        x, boxes = _flips(window(c, top, left, s), boxes[keep], rng)
        return ((x - self.mean) / self.std)[None].contiguous(), boxes, labels[keep]


class SceneSet:
    """Held-out scenes measured whole through overlapping windows (``--tile``): what
    detect.predict reads instead of a BoxDataset."""

    def __init__(self, cached: list[Cached], size: int, mean: float, std: float):
        self.cached, self.size, self.mean, self.std = cached, size, mean, std
        self.overlap = size // 4  # a target up to this long lies whole in some window


def collate(batch) -> dict[str, torch.Tensor]:
    """Images stacked; boxes and labels padded to the most boxes of the batch, with counts
    (tensors all: the loop and DeepSpeed move them like any batch)."""
    n = max((len(b[1]) for b in batch), default=0)
    boxes = torch.zeros(len(batch), n, 4)
    labels = torch.zeros(len(batch), n, dtype=torch.long)
    for i, (_, bx, lb) in enumerate(batch):
        boxes[i, : len(bx)] = bx
        labels[i, : len(lb)] = lb
    return {
        "images": torch.stack([b[0] for b in batch]),
        "boxes": boxes,
        "labels": labels,
        "counts": torch.tensor([len(b[1]) for b in batch], dtype=torch.long),
    }
