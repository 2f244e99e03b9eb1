"""Learning on real MSTAR chips: a tiny SAR-KnowLIP pretrained for a few CPU minutes.

Training records: the MSTAR SOC train split (17 deg depression), each chip with 8 sub-texts
written from its class (see test_pretrain_data); the central 88 x 88 of each 128 x 128 chip
(the usual MSTAR crop) resized to 64. Held out: 20 chips per class from the
test split (15 deg). Retrieval counts a hit when the top-ranked item shows the same class
(the texts of one class differ only in wording), so chance is the sum of squared class
shares (0.1 here); R@1 must reach 3x chance both ways. The losses must fall on
the held-out pairs: the trained model against the same model as initialised (same seed),
scored with the same masks and negatives and no distillation.
"""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch
from conftest import shared
from test_pretrain_data import mstar_records, write_jsonl

LEARN = [
    "--vision", "vit_tiny_patch16_224", "--image-size", "64", "--center-crop", "0.6875",
    "--text-layers", "1", "--no-augment",
    "--max-tokens", "32", "--embed-dim", "128", "--queue-size", "256", "--batch-size", "32",
    "--lr", "1e-3", "--text-lr-scale", "0.1", "--warmup-steps", "10", "--momentum", "0.9",
    "--log-every", "5", "--decoder-loss", "mlm",
    "--workers", "1", "--save-every", "0",
]  # fmt: skip
# A ViT from random init learns MSTAR slowly: with the default augmentation (crops down to
# half the area, flips, turns) even supervised training of this ViT sat at chance after 200
# steps here, and so did this pretraining. Without it, 300 steps of 32 (3.5 epochs, about
# 5 CPU minutes) give held-out R@1 (image->text, text->image) of (0.615, 0.805) with this
# seed, and (0.39, 0.575) and (0.425, 0.575) with seeds 7 and 3 (chance 0.1).
# The paper's MLM decoder only: the causal LM (the default adds it) costs ~1.5x the decoder
# pass and is not what this test measures; the TINY runs of test_pretrain train both.
STEPS = 300
pytestmark = pytest.mark.slow  # 5-9 min: `make test-all`


def held_out_losses(model, images, enc, codec, seed: int = 0) -> dict[str, float]:
    from sarkit.model.knowlip import Momentum

    momentum = Momentum(model, 0, 0.0)
    momentum.copy_from(model)
    torch.manual_seed(seed)
    special = [codec.cls_id, codec.sep_id, codec.pad_id]
    totals = {"itc": 0.0, "itm": 0.0, "mlm": 0.0}
    with torch.no_grad():
        for s in range(0, len(images), 40):
            out = model(images[s : s + 40], enc.input_ids[s : s + 40],
                        enc.attention_mask[s : s + 40], momentum, 0.0, None, special,
                        codec.mask_id)  # fmt: skip
            for k in totals:
                totals[k] += float(out[k]) / (len(images) // 40)
    return totals


def evaluate(run, held: list[dict]) -> dict:
    """Held-out class-level R@1 both ways, chance, and held-out losses before/after."""
    from sarkit.model.knowlip import KnowLIP
    from sarkit.model.text import TextCodec
    from sarkit.train.data import TileDataset

    model = KnowLIP.from_run(run).eval()
    cfg = model.config
    codec = TextCodec.from_pretrained(None, cfg.fields, cfg.max_tokens)
    ds = TileDataset(held, cfg.image_size, mean=cfg.image_mean, std=cfg.image_std,
                     center_crop=cfg.center_crop)  # fmt: skip
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    enc = codec.encode([r["texts"] for r in held])
    labels = torch.tensor([r["label"] for r in held])
    with torch.no_grad():
        _, img = model.encode_images(images)
        txt = model.encode_texts(enc)
    sim = img @ txt.T
    shares = torch.bincount(labels).float() / len(labels)
    result = {
        "i2t": float((labels[sim.argmax(1)] == labels).float().mean()),
        "t2i": float((labels[sim.argmax(0)] == labels).float().mean()),
        "chance": float((shares**2).sum()),
    }
    torch.manual_seed(42)  # the trainer's seed: the same initial weights
    # from_run points the config at the run's own trained text export; the initial model
    # starts from the offline MiniLM, as the run did
    initial = KnowLIP(dataclasses.replace(cfg, text=None)).eval()
    result["before"] = held_out_losses(initial, images, enc, codec)
    result["after"] = held_out_losses(model, images, enc, codec)
    return result


def test_pretraining_learns_on_mstar(tmp_path, cli):
    root = shared("mstar")
    train = write_jsonl(tmp_path / "train.jsonl", mstar_records(root, "train", None, seed=0))
    held = mstar_records(root, "val", 20, seed=1)
    run = tmp_path / "run"
    cli("pretrain", train, "-o", run, *LEARN, "--max-steps", str(STEPS), check=0)
    r = evaluate(run, held)
    print(f"held-out R@1 image->text {r['i2t']:.3f}, text->image {r['t2i']:.3f}, "
          f"chance {r['chance']:.3f}; losses before {r['before']} after {r['after']}")  # fmt: skip
    assert r["i2t"] >= 3 * r["chance"] and r["t2i"] >= 3 * r["chance"], r
    for key in ("itc", "itm", "mlm"):
        assert r["after"][key] < r["before"][key], key

    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == STEPS // 5
    first = sum(float(r["loss"]) for r in rows[:3])
    last = sum(float(r["loss"]) for r in rows[-3:])
    assert last < first
