"""Records built from real MSTAR chips for the pretraining tests, and the dataset module.

MSTAR has class labels, not captions: each chip gets 8 sub-texts (the terrain task's field
names) written from its class with wording varied per record, so a model can only tie an
image to its text by recognising the target.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from sarkit.model import TERRAIN_FIELDS

# folder index -> (designation, kind, a few words on the silhouette)
MSTAR_CLASSES = [
    ("2S1", "self-propelled howitzer", "a tracked hull with a large turret and a long gun"),
    ("BMP2", "infantry fighting vehicle", "a low tracked hull with a small turret"),
    ("BRDM2", "armoured scout car", "a four-wheeled boat-shaped hull"),
    ("BTR60", "armoured personnel carrier", "a long eight-wheeled hull"),
    ("BTR70", "armoured personnel carrier", "an eight-wheeled hull with a small turret"),
    ("D7", "bulldozer", "a tracked tractor with a wide front blade"),
    ("T62", "main battle tank", "a tracked hull with a round turret"),
    ("T72", "main battle tank", "a tracked hull with a flat turret and long gun"),
    ("ZIL131", "cargo truck", "a six-wheeled cab and a box body"),
    ("ZSU234", "anti-aircraft gun", "a tracked hull with a boxy turret and radar"),
]

# The target's name or kind comes early in every field, so even a short token budget
# (the tests' --max-tokens) keeps what identifies it; the rest of each sentence varies.
TEMPLATES = {
    "Terrain": [
        "{name} on flat open ground.",
        "{kind} on a level clutter field.",
        "{name} {kind} on a featureless plain.",
    ],
    "Functionality": [
        "Military {kind}, a {name}.",
        "{name}: a parked {kind}.",
        "A single {kind} of type {name}.",
    ],
    "Distribution": [
        "{name} centred in the chip.",
        "{kind} concentrated at the centre.",
        "One {name} occupies the middle.",
    ],
    "Layout": ["{shape}.", "Target with {shape}.", "From above, {shape} ({name})."],
    "Boundary": [
        "{kind} outlined by sharp edges.",
        "{name} stands out from the dark ground.",
        "{name} outline marked by bright edges.",
    ],
    "Buildings": [
        "{name} only, no buildings.",
        "{kind} present, no buildings.",
        "No structures apart from the {kind}.",
    ],
    "Roads": [
        "{name} off-road, no roads.",
        "{kind} with no road around it.",
        "No road network near the {name}.",
    ],
    "Water": [
        "{kind} on dry land, no water.",
        "{name} on dry ground, water absent.",
        "No water bodies near the {name}.",
    ],
}


def mstar_texts(label: int, rng: random.Random) -> dict[str, str]:
    name, kind, shape = MSTAR_CLASSES[label]
    return {
        f: rng.choice(TEMPLATES[f]).format(name=name, kind=kind, shape=shape)
        for f in TERRAIN_FIELDS
    }


def mstar_records(root: Path, split: str, per_class: int | None, seed: int = 0) -> list[dict]:
    """`per_class` chips of each class from `split` (train/val), with made-up texts."""
    rng = random.Random(seed)
    text = (root / f"{split}.txt").read_text().replace("\\", "/")  # val.txt has Windows separators
    rows = [line.split() for line in text.splitlines() if line]
    by_class: dict[int, list[str]] = {}
    for rel, label in rows:
        by_class.setdefault(int(label), []).append(rel)
    records = []
    for label, rels in sorted(by_class.items()):
        rels = sorted(rels)
        rng.shuffle(rels)
        for rel in rels[:per_class]:
            records.append(
                {
                    "id": f"mstar/{split}/{rel}",
                    "path": str(root / split / rel),
                    "label": label,
                    "group": MSTAR_CLASSES[label][0],  # a class's texts are interchangeable
                    "texts": mstar_texts(label, rng),
                }
            )
    rng.shuffle(records)
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_records_and_dataset(tmp_path):
    from conftest import shared

    from sarkit.model.text import TextCodec
    from sarkit.train.data import Augment, EpochSampler, ImageTextCollate, TileDataset

    root = shared("mstar")
    records = mstar_records(root, "train", 2)
    assert len(records) == 20 and {r["label"] for r in records} == set(range(10))
    records[0]["mlm_exclude"] = ["Roads"]
    ds = TileDataset(records, 48, augment=Augment(), seed=3)
    a, b = ds[0][0], ds[0][0]
    assert a.shape == (1, 48, 48) and torch.equal(a, b)  # same (seed, epoch, index): same view
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], a)  # another epoch: another crop/flip/turn
    plain = TileDataset(records, 48)
    x = plain[0][0]
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05
    codec = TextCodec.from_pretrained(None, TERRAIN_FIELDS, 96)
    batch = ImageTextCollate(records, codec)([ds[0], ds[1]])
    assert batch["images"].shape == (2, 1, 48, 48)
    roads = batch["segment_ids"][0] == TERRAIN_FIELDS.index("Roads") + 1
    assert roads.any() and not batch["mlm_eligible"][0][roads].any()
    assert batch["mlm_eligible"][1].all()
    # ranks get disjoint, equal shares; a resumed epoch skips what was seen
    s0, s1 = EpochSampler(21, 5, 0, 2), EpochSampler(21, 5, 1, 2)
    assert len(s0.indices()) == len(s1.indices()) == 11
    assert set(s0.indices()) | set(s1.indices()) == set(range(21))
    s0.set_epoch(0, start=4)
    assert list(s0) == s0.indices()[4:]


def test_persistent_workers_see_each_epochs_augmentation(tmp_path):
    """The loop's workers live for the whole run: the epoch that seeds the augmentation
    reaches them through the sampler's (epoch, index) keys, so two workers kept across
    epochs load exactly the views one process does, and a new epoch new views."""
    import torch
    from PIL import Image

    from sarkit.train.data import Augment, EpochKeyed, EpochSampler, TileDataset

    rng = np.random.default_rng(0)
    records = []
    for k in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / f"{k}.png")
        records.append({"id": str(k), "path": str(tmp_path / f"{k}.png")})

    def epochs(workers: int) -> list[torch.Tensor]:
        sampler = EpochSampler(len(records), 1, keyed=True)
        loader = torch.utils.data.DataLoader(
            EpochKeyed(TileDataset(records, 32, augment=Augment(), seed=2)),
            batch_size=3, sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
        )  # fmt: skip
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            out.append(torch.cat([images for images, _ in loader]))
        return out

    one, two = epochs(0), epochs(2)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    assert not torch.equal(one[0], one[1])


def test_read_gray_geotiff_and_png(tmp_path):
    import rasterio
    from PIL import Image

    from sarkit.train.data import read_gray

    arr = (np.random.default_rng(0).gamma(1.0, 1e-3, (40, 30))).astype(np.float32)
    tif = tmp_path / "t.tif"
    with rasterio.open(
        tif, "w", driver="GTiff", width=30, height=40, count=1, dtype="float32"
    ) as dst:
        dst.write(arr, 1)
    g = read_gray(tif)
    assert g.shape == (40, 30) and 0 <= g.min() and g.max() <= 1 and g.std() > 0.1
    png = tmp_path / "t.png"
    Image.fromarray(np.full((8, 9, 3), 128, np.uint8)).save(png)
    assert np.allclose(read_gray(png), 128 / 255)
