"""Cut the HRSID mini scenes into labelled tiles, so a "ship" query has a base rate below 1.

    .venv/bin/python bench/hrsid_tiles.py ../shared/data/hrsid_mini -o T [--tile 100]
        [--test-scenes 8] [--corrupt 0.2] [--seed 0]

Every HRSID scene holds ships, so a search for "ship" over whole scenes is right by
construction. Cut into TILE x TILE tiles, some tiles hold ships and most hold open sea.
Each tile is labelled from its mask: ``ships`` = connected components of >= 4 ship pixels
(the rule of ``finetune build --from MASKS``), ``label`` = 1 when it has any, else 0.

The split is by source image, not by tile or scene: the 36 scenes are overlapping crops of
14 HRSID images (``P0001_...``), so whole source images go to test (seeded) until at least
``--test-scenes`` scenes are there; no tile of one image is on both sides.

Written into ``-o``:

* ``images/<tile>.png``, ``masks/<tile>.png``: the tiles and their mask tiles (lossless
  crops of the decoded JPEG), a folder ``finetune build --from masks --images images``
  reads; ``test_list.txt`` names the test tiles for its ``--test-list``;
* ``train.jsonl``: training tiles with two label-built text fields, ``Count`` (build.py's
  no-position count wording, "there are two ships in the image", or its empty wording) and
  ``Position`` (the 3x3 regions, "located in the upper left region" / "open sea with no
  ship"), template drawn per tile; ``noisy.jsonl`` is the same with ``--corrupt`` of the
  segments swapped for the same field of a tile of the other label (tests/test_scio_learn's
  ``corrupt``), and ``bad.json`` lists the swapped (id, field) pairs;
* ``test.jsonl``: test tiles with ``label`` and ``ships`` only (what search is scored on);
* ``queries.json``: ship / no-ship queries for bench/search_precision.py ``--queries``;
* ``summary.json``: tile counts and base rates per split.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

QUERIES = [
    {"text": "ship", "label": 1},
    {"text": "ships at sea", "label": 1},
    {"text": "open sea without ships", "label": 0},
]
POSITION_TEMPLATES = (
    "located in the {where}",
    "seen in the {where}",
    "at the {where} of the tile",
)
EMPTY_POSITION = ("open sea with no ship", "only open sea, no ship anywhere", "calm open sea")


def source_image(scene: str) -> str:
    """``P0001_1200_2000_9600_10400`` -> ``P0001``: the HRSID image the scene was cut from."""
    return scene.split("_")[0]


def test_scenes(scenes: list[str], at_least: int, seed: int) -> set[str]:
    """Whole source images, in seeded order, until at least `at_least` scenes are in test."""
    parents = sorted({source_image(s) for s in scenes})
    random.Random(seed).shuffle(parents)
    chosen: set[str] = set()
    for p in parents:
        if sum(source_image(s) in chosen for s in scenes) >= at_least:
            break
        chosen.add(p)
    return {s for s in scenes if source_image(s) in chosen}


def texts(img, rng: random.Random) -> dict[str, str]:
    """The two label-built fields of one tile (build.py's wording for the count)."""
    from sarkit.tasks.vl.build import (
        EMPTY_TEMPLATES,
        REGIONS,
        TEMPLATES_NO_POSITION,
        _join,
        number_word,
        object_regions,
        plural,
    )

    n = len(img.objects)
    t = rng.randrange(len(TEMPLATES_NO_POSITION))
    if n == 0:
        count = EMPTY_TEMPLATES[t]
        position = rng.choice(EMPTY_POSITION)
    else:
        fill = {
            "n": number_word(n),
            "cats": plural("ship", n),
            "be": "is" if n == 1 else "are",
            "appear": "appears" if n == 1 else "appear",
        }
        count = TEMPLATES_NO_POSITION[t].format(**fill)
        where = [REGIONS[r - 1] for r in sorted(set(object_regions(img)["ship"]))]
        place = _join(where) + (" region" if len(where) == 1 else " regions")
        position = rng.choice(POSITION_TEMPLATES).format(where=place)
    cap = lambda s: s[0].upper() + s[1:] + "."  # noqa: E731
    return {"Count": cap(count), "Position": cap(position)}


def cut(data: Path, out: Path, tile: int) -> list[str]:
    """Write the tiles and mask tiles; return the scene names."""
    from PIL import Image

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    scenes = sorted(p.stem for p in (data / "images").glob("*.jpg"))
    for scene in scenes:
        img = np.array(Image.open(data / "images" / f"{scene}.jpg").convert("L"))
        mask = np.array(Image.open(data / "masks" / f"{scene}.png").convert("RGB"))
        h, w = img.shape
        for r in range(h // tile):
            for c in range(w // tile):
                sl = np.s_[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
                name = f"{scene}_r{r}c{c}"
                Image.fromarray(img[sl]).save(out / "images" / f"{name}.png")
                Image.fromarray(mask[sl]).save(out / "masks" / f"{name}.png")
    return scenes


def main() -> None:
    from test_scio_learn import corrupt

    from sarkit.tasks.vl.annotations import read_annotations

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="hrsid_mini folder (images/, masks/)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--tile", type=int, default=100)
    ap.add_argument("--test-scenes", type=int, default=8)
    ap.add_argument("--corrupt", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = args.output
    scenes = cut(args.data, out, args.tile)
    test = test_scenes(scenes, args.test_scenes, args.seed)
    ann = read_annotations(out / "masks", out / "images", "0,255,0=ship", "ship")
    if ann.problems:
        raise SystemExit(f"{len(ann.problems)} problem(s), first: {ann.problems[0]}")
    rng = random.Random(args.seed)
    train, held = [], []
    for img in sorted(ann.images, key=lambda i: i.name):
        scene = img.name.rsplit("_", 1)[0]
        row = {
            "id": f"hrsid/{img.name}",
            "path": f"images/{img.path.name}",  # relative to -o, as records are read
            "label": int(bool(img.objects)),
            "ships": len(img.objects),
        }
        if scene in test:
            held.append(row)
        else:
            train.append({**row, "texts": texts(img, rng)})
    write = lambda name, rows: (out / name).write_text(  # noqa: E731
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    write("train.jsonl", train)
    write("test.jsonl", held)
    noisy = json.loads(json.dumps(train))
    bad = corrupt(noisy, args.corrupt, seed=args.seed)
    write("noisy.jsonl", noisy)
    (out / "bad.json").write_text(json.dumps(sorted(bad)) + "\n")
    (out / "test_list.txt").write_text("".join(r["id"].split("/")[1] + "\n" for r in held))
    (out / "queries.json").write_text(json.dumps(QUERIES, indent=1) + "\n")
    share = lambda rows: round(sum(r["label"] for r in rows) / len(rows), 4)  # noqa: E731
    summary = {
        "tile": args.tile,
        "scenes": {"train": len(scenes) - len(test), "test": len(test)},
        "test_images": sorted({source_image(s) for s in test}),
        "tiles": {"train": len(train), "test": len(held)},
        "ship_share": {"train": share(train), "test": share(held)},
        "ships": {"train": sum(r["ships"] for r in train), "test": sum(r["ships"] for r in held)},
        "corrupted_segments": len(bad),
        "segments": 2 * len(train),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
