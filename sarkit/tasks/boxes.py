"""`sarkit finetune build --boxes-from-masks`: ship boxes from binary masks, as COCO JSON.

HRSID's masks are RGB PNGs, black sea and green ships: each 8-connected component of ship
pixels becomes one box (and its pixel count the area). Images are matched to masks by file
stem (``images/NAME.jpg`` for ``masks/NAME.png``). A mask that cannot be read, has another
size than its image, has no image, or holds colours other than black and green is skipped
and counted (the first named); none usable is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sarkit import log
from sarkit.atomic import write_text
from sarkit.errors import SarkitError
from sarkit.hookspecs import HeadOption

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def ship_pixels(mask: np.ndarray, path: Path) -> np.ndarray:
    """Boolean ship map of an RGB (green on black) or single-band (non-zero) mask."""
    if mask.ndim == 2:
        return mask > 0
    if mask.ndim != 3 or mask.shape[2] < 3:
        raise SarkitError(f"{path}: mask of shape {mask.shape}, expected H x W or H x W x 3")
    rgb = mask[..., :3].astype(np.int16)
    green = (rgb[..., 1] >= 128) & (rgb[..., 0] < 128) & (rgb[..., 2] < 128)
    black = (rgb < 128).all(axis=-1)
    other = ~(green | black)
    if other.any():
        y, x = np.argwhere(other)[0]
        raise SarkitError(
            f"{path}: pixel ({x}, {y}) is {tuple(int(v) for v in rgb[y, x])}, neither black "
            "(sea) nor green (ship)"
        )
    return green


def components(ships: np.ndarray, min_area: int) -> list[tuple[list[float], int]]:
    """([x, y, w, h], pixel count) of each 8-connected component of at least `min_area`."""
    from scipy import ndimage

    labels, n = ndimage.label(ships, structure=np.ones((3, 3), dtype=bool))
    out = []
    for index, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        ys, xs = found
        area = int((labels[found] == index).sum())
        if area < min_area:
            continue
        out.append(
            (
                [
                    float(xs.start),
                    float(ys.start),
                    float(xs.stop - xs.start),
                    float(ys.stop - ys.start),
                ],
                area,
            )
        )
    return out


def find_folders(root: Path, images: Path | None) -> tuple[Path, Path]:
    """(mask folder, image folder): ROOT/masks + ROOT/images, or MASKDIR + its sibling."""
    root = Path(root)
    if not root.is_dir():
        raise SarkitError(f"--boxes-from-masks {root}: not a folder")
    masks = root / "masks" if (root / "masks").is_dir() else root
    if images is None:
        images = root / "images" if (root / "masks").is_dir() else root.parent / "images"
    if not Path(images).is_dir():
        raise SarkitError(f"{images}: no image folder beside the masks (give --images DIR)")
    return masks, Path(images)


def build_coco(root: Path, output: Path, images: Path | None = None, min_area: int = 4) -> str:
    from PIL import Image

    mask_dir, image_dir = find_folders(root, images)
    by_stem = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    mask_files = sorted(
        p for p in mask_dir.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff", ".bmp")
    )
    if not mask_files:
        raise SarkitError(f"{mask_dir}: no mask files (PNG)")
    coco: dict[str, Any] = {
        "info": {"description": f"boxes from the masks in {mask_dir}", "source": "sarkit"},
        "images": [],
        "annotations": [],
        "categories": [{"id": 1, "name": "ship", "supercategory": "ship"}],
    }
    skipped: list[str] = []
    specks = 0
    base = Path(output).resolve().parent
    for mask_path in mask_files:
        image_path = by_stem.get(mask_path.stem)
        try:
            if image_path is None:
                raise SarkitError(f"{mask_path}: no image named {mask_path.stem}.* in {image_dir}")
            try:
                with Image.open(mask_path) as im:
                    mask = np.asarray(im.convert("RGB") if im.mode == "P" else im)
                with Image.open(image_path) as im:
                    width, height = im.size
            except OSError as exc:
                raise SarkitError(f"{mask_path}: unreadable ({exc})") from None
            if mask.shape[:2] != (height, width):
                raise SarkitError(
                    f"{mask_path}: {mask.shape[1]}x{mask.shape[0]} mask for a "
                    f"{width}x{height} image ({image_path.name})"
                )
            ships = ship_pixels(mask, mask_path)
        except SarkitError as exc:
            skipped.append(str(exc))
            continue
        image_id = len(coco["images"]) + 1
        coco["images"].append(
            {
                "id": image_id,
                "file_name": os.path.relpath(image_path.resolve(), base),
                "width": int(width),
                "height": int(height),
            }
        )
        found = components(ships, 1)
        for bbox, area in found:
            if area < min_area:
                specks += 1
                continue
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": bbox,
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
    if skipped:
        log.warn(f"skipped {len(skipped)} mask(s); first: {skipped[0]}")
    if not coco["images"]:
        raise SarkitError(f"{mask_dir}: no usable mask ({skipped[0]})")
    write_text(output, json.dumps(coco) + "\n")
    return (
        f"{len(coco['images'])} images, {len(coco['annotations'])} ship boxes -> {output}"
        + (f" ({specks} components under {min_area} px left out)" if specks else "")
        + (f"; {len(skipped)} mask(s) skipped" if skipped else "")
    )


class BoxesFromMasks:
    """The built-in `finetune build` builder for ship masks."""

    name = "boxes-from-masks"
    trigger = "--boxes-from-masks"
    options = (
        HeadOption(
            "--boxes-from-masks",
            "Folder of ship masks (or a folder holding masks/ and images/): COCO boxes "
            "from their connected components.",
            modes=("build",),
        ),
        HeadOption(
            "--images",
            "Image folder for --boxes-from-masks (default: images/ beside masks/).",
            modes=("build",),
        ),
        HeadOption(
            "--min-area",
            "Leave out mask components smaller than this many pixels (speckle).",
            default=4,
            type=int,
            modes=("build",),
        ),
    )

    def build(self, options: Mapping[str, Any], output: Path) -> str:
        images = options.get("images")
        return build_coco(
            Path(options["boxes_from_masks"]),
            output,
            Path(images) if images else None,
            int(options.get("min_area") or 1),
        )
