"""Read detection and segmentation annotations into one shape: images with objects and landforms.

Four sources, recognised from what ``--from`` names:

* a COCO JSON file (``images``, ``annotations`` with ``bbox`` [x, y, w, h], ``categories``);
* a VOC XML file or a folder of them (``<object><name>`` and ``<bndbox>``);
* a folder of mask PNGs (index or palette images, or RGB colour masks), one per image of the
  same stem in ``--images``: classes named by ``--classes`` (``1=water`` or ``0,255,0=ship``),
  values not named are unlabelled; classes in ``--objects`` are instances (one per connected
  component), the other named classes are landforms (pixel shares per image and per region);
* a folder of class subfolders (``mstar/train/0/*.jpeg``): one target per image, of the
  folder's class, with no box (so no position is known).

A problem with one image or annotation (missing file, unknown image id, a box outside the
image) is counted and named in ``problems``; the good images go on.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sarkit.errors import SarkitError, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class Obj:
    """One target: its category and its box (x0, y0, x1, y1 in pixels), when known."""

    category: str
    box: tuple[float, float, float, float] | None = None

    def centre(self) -> tuple[float, float] | None:
        if self.box is None:
            return None
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Image:
    """One annotated image: objects (possibly none) and landform pixel counts, when masks
    give them (``landforms`` for the whole image, ``region_landforms`` per 3x3 cell)."""

    name: str
    path: Path
    width: int
    height: int
    objects: list[Obj] = field(default_factory=list)
    landforms: dict[str, int] | None = None
    region_landforms: list[dict[str, int]] | None = None


@dataclass
class Annotations:
    images: list[Image]
    categories: list[str]  # object categories, in the source's order
    landforms: list[str]  # landform classes (empty: the source has none)
    has_boxes: bool  # positions are known
    source: str
    kind: str  # coco, voc, masks, folders
    problems: list[str] = field(default_factory=list)


_CLASS_ENTRY = re.compile(
    r"\s*(\d+(?:\s*,\s*\d+)*)\s*=\s*([^=;]+?)\s*(?:[,;](?=\s*\d[\d\s,]*=)|;|$)"
)


def parse_classes(spec: str | None) -> dict[tuple[int, ...], str]:
    """``1=bare soil,2=water`` or ``0,255,0=ship,255,0,0=oil`` -> {pixel value: name}.

    A key of one number is an index (or palette index); of three, an RGB colour.
    """
    if not spec:
        return {}
    out: dict[tuple[int, ...], str] = {}
    pos = 0
    while pos < len(spec):
        m = _CLASS_ENTRY.match(spec, pos)
        if not m or m.end() == pos:
            raise UsageError(
                f"--classes '{spec[pos:]}': write VALUE=NAME entries (e.g. '1=water,2=urban' "
                "or '0,255,0=ship')"
            )
        value = tuple(int(v) for v in m.group(1).split(","))
        out[value] = m.group(2).strip()
        pos = m.end()
    return out


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image as PILImage

    with PILImage.open(path) as im:
        return im.size


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for cand in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if cand.exists():
                return cand
    return None


def _clip_box(box, w: int, h: int, where: str, problems: list[str]):
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0) or x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        problems.append(f"{where}: box {[x0, y0, x1, y1]} is empty or outside the {w}x{h} image")
        return None
    return max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)


# ---------------------------------------------------------------- COCO


def read_coco(path: Path, images_dir: Path | None) -> Annotations:
    try:
        data = json.loads(path.read_text())
        cats = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        entries = data["images"]
        anns = data.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SarkitError(f"{path}: not a COCO annotation file ({exc})") from None
    base = images_dir or path.parent
    problems: list[str] = []
    by_id: dict[int, Image] = {}
    for entry in entries:
        try:
            name = str(entry["file_name"])
            iid = int(entry["id"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path}: image entry {entry!r:.60} has no id or file_name")
            continue
        img_path = base / name
        if not img_path.exists():
            problems.append(f"{path}: image {iid} ({name}): file not found under {base}")
            continue
        w, h = entry.get("width"), entry.get("height")
        if not w or not h:
            w, h = _image_size(img_path)
        by_id[iid] = Image(Path(name).stem, img_path, int(w), int(h))
    missing_ids: set[int] = set()
    for i, ann in enumerate(anns):
        try:
            iid, cid = int(ann["image_id"]), int(ann["category_id"])
            x, y, bw, bh = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path}: annotation {ann.get('id', i)} lacks image_id/category/bbox")
            continue
        img = by_id.get(iid)
        if img is None:
            if iid not in missing_ids and iid not in {int(e.get("id", -1)) for e in entries}:
                problems.append(f"{path}: annotation {ann.get('id', i)}: no image with id {iid}")
            missing_ids.add(iid)
            continue
        if cid not in cats:
            problems.append(f"{path}: annotation {ann.get('id', i)}: unknown category {cid}")
            continue
        where = f"{path}: annotation {ann.get('id', i)} (image {img.name})"
        box = _clip_box((x, y, x + bw, y + bh), img.width, img.height, where, problems)
        if box is not None:
            img.objects.append(Obj(cats[cid], box))
    return Annotations(
        list(by_id.values()), list(cats.values()), [], True, str(path), "coco", problems
    )


# ---------------------------------------------------------------- VOC


def read_voc(path: Path, images_dir: Path | None) -> Annotations:
    files = sorted(path.glob("*.xml")) if path.is_dir() else [path]
    if not files:
        raise SarkitError(f"{path}: no VOC .xml file")
    base = images_dir or (path if path.is_dir() else path.parent)
    if images_dir is None and (base.parent / "JPEGImages").is_dir():
        base = base.parent / "JPEGImages"
    images, problems, cats = [], [], []
    for xml in files:
        try:
            root = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as exc:
            problems.append(f"{xml}: not readable XML ({exc})")
            continue
        name = (root.findtext("filename") or "").strip() or xml.stem
        img_path = base / name
        if not img_path.exists():
            found = _find_image(base, Path(name).stem)
            if found is None:
                problems.append(f"{xml}: image {name} not found under {base}")
                continue
            img_path = found
        try:
            w = int(float(root.findtext("size/width") or 0))
            h = int(float(root.findtext("size/height") or 0))
        except ValueError:
            w = h = 0
        if not w or not h:
            w, h = _image_size(img_path)
        img = Image(img_path.stem, img_path, w, h)
        for k, obj in enumerate(root.findall("object")):
            cat = (obj.findtext("name") or "").strip()
            try:
                box = [float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError):
                problems.append(f"{xml}: object {k} ({cat or 'no name'}) has no complete bndbox")
                continue
            if not cat:
                problems.append(f"{xml}: object {k} has no name")
                continue
            box = _clip_box(box, w, h, f"{xml}: object {k} ({cat})", problems)
            if box is None:
                continue
            if cat not in cats:
                cats.append(cat)
            img.objects.append(Obj(cat, box))
        images.append(img)
    return Annotations(images, cats, [], True, str(path), "voc", problems)


# ---------------------------------------------------------------- masks


def _class_map(mask: np.ndarray, classes: dict[tuple[int, ...], str]) -> dict[str, np.ndarray]:
    """{class name: boolean mask}; index keys match a single-band value, colour keys RGB."""
    out: dict[str, np.ndarray] = {}
    for value, name in classes.items():
        if mask.ndim == 2:
            if len(value) != 1:
                continue
            hit = mask == value[0]
        else:
            if len(value) == 1:
                continue
            hit = np.all(mask[..., : len(value)] == np.array(value), axis=-1)
        out[name] = out.get(name, np.zeros(mask.shape[:2], bool)) | hit
    return out


def grid_cells(h: int, w: int) -> list[tuple[slice, slice]]:
    """The nine 3x3 cells, row by row from the upper left (region 1) to the lower right (9)."""
    rows = [round(h * k / 3) for k in range(4)]
    cols = [round(w * k / 3) for k in range(4)]
    return [
        (slice(rows[r], rows[r + 1]), slice(cols[c], cols[c + 1]))
        for r in range(3)
        for c in range(3)
    ]


def read_masks(
    folder: Path,
    images_dir: Path | None,
    classes: dict[tuple[int, ...], str],
    objects: set[str],
    min_pixels: int = 4,
) -> Annotations:
    from PIL import Image as PILImage
    from scipy import ndimage

    if not classes:
        raise UsageError(
            f"--from {folder}: a mask folder needs --classes (e.g. '1=water,2=urban' or "
            "'0,255,0=ship'); values not named are unlabelled"
        )
    unknown = objects - set(classes.values())
    if unknown:
        raise UsageError(f"--objects {', '.join(sorted(unknown))}: not among --classes names")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise SarkitError(f"{folder}: no mask .png files")
    base = images_dir or folder
    names = list(dict.fromkeys(classes.values()))
    landform_names = [n for n in names if n not in objects]
    images, problems = [], []
    for mpath in files:
        img_path = _find_image(base, mpath.stem) if base != folder else None
        if img_path is None or img_path == mpath:
            problems.append(f"{mpath}: no image {mpath.stem}.* under {base}")
            continue
        try:
            with PILImage.open(mpath) as im:
                mask = np.array(im if im.mode in ("L", "P", "I", "I;16") else im.convert("RGB"))
        except OSError as exc:
            problems.append(f"{mpath}: unreadable mask ({exc})")
            continue
        h, w = mask.shape[:2]
        iw, ih = _image_size(img_path)
        if (iw, ih) != (w, h):
            problems.append(f"{mpath}: mask is {w}x{h}, image {img_path.name} is {iw}x{ih}")
            continue
        per_class = _class_map(mask, classes)
        img = Image(img_path.stem, img_path, w, h)
        for name in names:
            if name not in objects:
                continue
            labels, n = ndimage.label(per_class[name])
            for k, sl in enumerate(ndimage.find_objects(labels), start=1):
                if sl is None or (labels[sl] == k).sum() < min_pixels:
                    continue
                ys, xs = sl
                img.objects.append(Obj(name, (xs.start, ys.start, xs.stop, ys.stop)))
        if landform_names:
            img.landforms = {n: int(per_class[n].sum()) for n in landform_names}
            img.region_landforms = [
                {n: int(per_class[n][cell].sum()) for n in landform_names}
                for cell in grid_cells(h, w)
            ]
        images.append(img)
    cats = [n for n in names if n in objects]
    return Annotations(images, cats, landform_names, True, str(folder), "masks", problems)


# ---------------------------------------------------------------- class folders


def read_folders(folder: Path, classes: dict[tuple[int, ...], str]) -> Annotations:
    names = {str(k[0]): v for k, v in classes.items() if len(k) == 1}
    subs = sorted(p for p in folder.iterdir() if p.is_dir())
    images, cats, problems = [], [], []
    for sub in subs:
        cat = names.get(sub.name, sub.name)
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files and cat not in cats:
            cats.append(cat)
        for f in files:
            try:
                w, h = _image_size(f)
            except OSError as exc:
                problems.append(f"{f}: unreadable image ({exc})")
                continue
            images.append(Image(f"{sub.name}/{f.stem}", f, w, h, [Obj(cat)]))
    if not images:
        raise SarkitError(f"{folder}: no class subfolder with images")
    return Annotations(images, cats, [], False, str(folder), "folders", problems)


def read_annotations(
    source: Path,
    images_dir: Path | None = None,
    classes: str | None = None,
    objects: str | None = None,
) -> Annotations:
    """Recognise the source's kind (see the module doc) and read it."""
    source = Path(source)
    if not source.exists():
        raise SarkitError(f"--from {source}: no such file or folder")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise SarkitError(f"--images {images_dir}: not a folder")
    class_map = parse_classes(classes)
    object_set = {o.strip() for o in (objects or "").split(",") if o.strip()}
    if source.is_file():
        if source.suffix.lower() == ".json":
            return read_coco(source, images_dir)
        if source.suffix.lower() == ".xml":
            return read_voc(source, images_dir)
        raise SarkitError(f"--from {source}: expected a COCO .json, a VOC .xml or a folder")
    if any(source.glob("*.xml")):
        return read_voc(source, images_dir)
    if any(p.suffix.lower() == ".png" for p in source.iterdir()):
        return read_masks(source, images_dir, class_map, object_set)
    if any(p.is_dir() for p in source.iterdir()):
        return read_folders(source, class_map)
    raise SarkitError(f"--from {source}: no COCO, VOC, mask or class-folder annotations found")
