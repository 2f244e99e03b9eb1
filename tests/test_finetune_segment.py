"""`sarkit finetune segment` / `sarkit eval segment` on real PolSF (index masks, 0 ignored)
and HRSID (colour masks through --palette) tiles, tiny ViT; bad masks skipped and named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import shared
from PIL import Image

TINY = [
    "--vision", "vit_tiny_patch16_224", "--image-size", "32", "--batch-size", "8",
    "--workers", "0", "--log-every", "1", "--warmup-steps", "1", "--epochs", "1",
]  # fmt: skip


@pytest.fixture
def cli(cli_in_process):
    return cli_in_process


def subset(src: Path, dest: Path, n: int, stride: int = 1) -> Path:
    for sub in ("images", "masks"):
        (dest / sub).mkdir(parents=True)
    for image in sorted((src / "images").iterdir())[::stride][:n]:
        mask = next((src / "masks").glob(image.stem + ".*"))
        os.symlink(image, dest / "images" / image.name)
        os.symlink(mask, dest / "masks" / mask.name)
    return dest


def test_polsf_index_masks_train_and_eval(cli, tmp_path):
    data = subset(shared("polsf_airsar"), tmp_path / "polsf", 10, stride=5)
    run = tmp_path / "run"
    names = "bare_soil,mountain,water,urban,vegetation"
    proc = cli("finetune", "segment", "--data", data, "-o", run, *TINY, "--max-steps", "2",
               "--ignore-index", "0", "--num-classes", "6", "--class-names", names,
               "--tile", "64", "--decoder-layers", "1", "--val-fraction", "0.2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["head"]["labels"] == [1, 2, 3, 4, 5] and config["head"]["tile"] == 64
    split = json.loads((run / "split.json").read_text())
    assert split["how"] == "seeded 4:1" and len(split["val"]) == 2 and len(split["train"]) == 8
    row = (run / "eval.csv").read_text().splitlines()
    assert row[0].startswith("step,epoch,oa,miou,iou_")
    # eval on the same held-out images gives the run's last evaluation
    held = tmp_path / "held"
    for sub in ("images", "masks"):
        (held / sub).mkdir(parents=True)
    for image in split["val"]:
        stem = Path(image).stem
        os.symlink(data / "images" / f"{stem}.png", held / "images" / f"{stem}.png")
        os.symlink(data / "masks" / f"{stem}.png", held / "masks" / f"{stem}.png")
    proc = cli("eval", "segment", run, "--data", held, "--overlays", "1", "--tile", "64",
               "--ignore-index", "0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)["metrics"]
    last = dict(zip(row[0].split(","), map(float, row[-1].split(",")), strict=True))
    assert abs(metrics["miou"] - last["miou"]) < 1e-5 and abs(metrics["oa"] - last["oa"]) < 1e-5
    overlays = list((run / "eval").glob("overlay_*.png"))
    assert len(overlays) == 1 and Image.open(overlays[0]).size == (3 * 128, 128)


def test_hrsid_colour_masks_and_bad_masks(cli, tmp_path):
    data = subset(shared("hrsid_mini"), tmp_path / "hrsid", 5)
    (data / "masks" / "bad.png").write_bytes(b"")  # an image-less, unreadable mask: ignored
    stem = sorted((data / "images").iterdir())[0].stem
    os.unlink(data / "masks" / f"{stem}.png")  # a mask of the wrong size
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(data / "masks" / f"{stem}.png")
    run = tmp_path / "run"
    palette = "0,0,0:sea;0,255,0:ship"
    proc = cli("finetune", "segment", "--data", data, "-o", run, *TINY, "--max-steps", "1",
               "--palette", palette, "--tile", "200", "--balance",
               "--rare-windows", "0.5")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 image/mask pair(s); first: " in proc.stderr
    assert "10x10 mask for a 800x800 image" in proc.stderr
    head = json.loads((run / "config.json").read_text())["head"]
    assert head["classes"] == ["sea", "ship"] and head["rare_windows"] == 0.5
    sea, ship = head["class_weights"]  # ships are rare: weighted up, the mean weight is 1
    assert ship > 10 * sea and abs((sea + ship) / 2 - 1) < 1e-6
    # a colour outside the palette, a colour mask without one, a bad palette
    proc = cli("finetune", "segment", "--data", data, "-o", tmp_path / "r1", *TINY,
               "--palette", "0,0,0:sea;9,9,9:x")  # fmt: skip
    assert proc.returncode == 1 and "(0, 255, 0), not in --palette" in proc.stderr
    proc = cli("finetune", "segment", "--data", data, "-o", tmp_path / "r2", *TINY)
    assert proc.returncode == 1 and "colour mask; give --palette" in proc.stderr
    proc = cli("finetune", "segment", "--data", data, "-o", tmp_path / "r2", *TINY,
               "--palette", "red:sea")  # fmt: skip
    assert proc.returncode == 2 and "is not 'R,G,B:name'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_rare_windows_show_ships_on_real_hrsid_masks():
    """HRSID scenes at 200 px windows: random windows show a ship in few of them, windows
    centred on the minority class in all of those so placed; the share follows the option;
    the same seed, epoch and index give the same window."""
    from sarkit.tasks import segdata

    root = shared("hrsid_mini")
    pal = segdata.Palette.parse("0,0,0:sea;0,255,0:ship")
    pairs = segdata.find(str(root))[0][:8]
    images, masks, _ = segdata.load_pairs(pairs, [0, 1], pal, None, "hrsid")

    def share(rare: float) -> float:
        ds = segdata.TileDataset(images, masks, 200, 200, 0.0, 1.0, seed=0, rare=rare)
        hits = [bool((ds[i][1] == 1).any()) for i in range(len(ds))]
        return sum(hits) / len(hits)

    base, half, every = share(0.0), share(0.5), share(1.0)
    assert every == 1.0 and base < 0.5 and base < half < every
    a = segdata.TileDataset(images, masks, 200, 200, 0.0, 1.0, seed=3, rare=0.5)
    b = segdata.TileDataset(images, masks, 200, 200, 0.0, 1.0, seed=3, rare=0.5)
    assert (a[5][1] == b[5][1]).all() and (a[5][0] == b[5][0]).all()
