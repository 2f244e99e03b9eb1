"""`sarkit finetune detect` / `sarkit eval detect` on real HRSID ships (boxes from masks, as
COCO JSON, and as a VOC folder), every --head on a tiny ViT; pycocotools checked by hand;
bad annotations named or counted."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared
from PIL import Image

TINY = [
    "--vision", "vit_tiny_patch16_224", "--image-size", "64", "--batch-size", "4",
    "--workers", "0", "--log-every", "1", "--warmup-steps", "1", "--fpn-channels", "32",
]  # fmt: skip


@pytest.fixture
def cli(cli_in_process):
    return cli_in_process


def hrsid_coco(cli, dest: Path, n: int = 6) -> Path:
    """DEST/hrsid.coco.json over links to the first `n` HRSID scenes and their masks."""
    root = shared("hrsid_mini")
    for sub in ("images", "masks"):
        (dest / sub).mkdir(parents=True)
    for image in sorted((root / "images").iterdir())[:n]:
        os.symlink(image, dest / "images" / image.name)
        os.symlink(root / "masks" / f"{image.stem}.png", dest / "masks" / f"{image.stem}.png")
    out = dest / "hrsid.coco.json"
    cli("finetune", "build", "--boxes-from-masks", dest, "-o", out, check=0)
    return out


def eval_rows(run: Path) -> list[dict]:
    with open(run / "eval.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------ metrics by hand


def test_coco_map_by_hand():
    """One image, two ships; detections ranked TP (IoU 1), false alarm, TP at IoU 0.625.

    COCO's AP is the mean of the interpolated precision at 101 recall points. At IoU
    thresholds <= 0.6 both ships are found: precision 1 up to recall 0.5, then 2/3 up to 1
    (51 points at 1, 50 at 2/3). At 0.65 .. 0.95 (7 thresholds) only the first: 51 points
    at 1, 50 at 0."""
    from sarkit.tasks.metrics import detection

    truth = {"boxes": np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float), "labels": [1, 1],
             "crowd": np.zeros(2, bool), "width": 100, "height": 100}  # fmt: skip
    found = {"boxes": np.array([[0, 0, 10, 10], [80, 80, 90, 90], [50, 50, 60, 56.25]]),
             "labels": [1, 1, 1], "scores": [0.9, 0.8, 0.7]}  # fmt: skip
    out = detection([truth], [found], ["ship"])
    both, one = (51 + 50 * 2 / 3) / 101, 51 / 101
    assert out["metrics"]["map50"] == pytest.approx(both, abs=1e-9)
    assert out["metrics"]["map"] == pytest.approx((3 * both + 7 * one) / 10, abs=1e-9)
    assert out["metrics"]["map75"] == pytest.approx(one, abs=1e-9)
    assert len(out["curves"]["ship"]) == 101 and out["curves"]["ship"][-1] == pytest.approx(2 / 3)
    # no detection at all: 0, not an error; no ground truth: an error, not a 0
    empty = {"boxes": np.zeros((0, 4)), "labels": [], "scores": []}
    assert detection([truth], [empty], ["ship"])["metrics"]["map50"] == 0.0
    bare = dict(truth, boxes=np.zeros((0, 4)), labels=[], crowd=np.zeros(0, bool))
    with pytest.raises(Exception, match="mAP is undefined"):
        detection([bare], [found], ["ship"])


def test_match_and_oracle_predictions_in_image_pixels():
    """Fig. 12's three kinds; and a perfect detector's boxes (in the model's square frame)
    come back in each image's own, non-square pixels: mAP 1."""
    from sarkit.tasks import detdata
    from sarkit.tasks.detect import match, measure

    truth = {"boxes": np.array([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], float),
             "labels": np.array([1, 1, 1]), "crowd": np.array([False, False, True])}  # fmt: skip
    boxes = [[0, 0, 10, 10], [80, 80, 90, 90], [20, 20, 30, 31], [50, 50, 60, 60]]
    found = {"boxes": np.array(boxes, float), "labels": np.array([1, 1, 1, 1]),
             "scores": np.array([0.9, 0.8, 0.7, 0.3])}  # fmt: skip
    tp, fa, missed = match(truth, found, 0.5)
    assert len(tp) == 1 and len(fa) == 1 and [list(m) for m in missed] == [[50, 50, 60, 60]]
    assert [len(x) for x in match(truth, found, 0.2)] == [2, 1, 0]

    class Oracle(torch.nn.Module):
        def __init__(self, boxes):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.boxes = boxes

        def forward(self, images):
            return [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.long),
                     "scores": torch.ones(len(b))} for b in self.boxes[: len(images)]]  # fmt: skip

    items = [detdata._item("a", Path("a"), 200, 100, [[10, 20, 50, 60]], [1], [False])]
    cached = [detdata.Cached(items[0], torch.zeros(64, 64, dtype=torch.uint8), 200, 100)]
    ds = detdata.BoxDataset(cached, 64, 0.5, 0.5, False)
    _, boxes, _ = ds[0]  # the target in the model's frame
    assert boxes[0].tolist() == pytest.approx([3.2, 12.8, 16.0, 38.4])
    metrics = measure(Oracle([boxes]), ds, ["ship"])[0]["metrics"]
    assert metrics["map50"] == pytest.approx(1.0) and metrics["map"] == pytest.approx(1.0)


def _scene(boxes: list[list[int]], h: int = 200, w: int = 300):
    """A cached scene, box k filled with 250 - 50 k and 0 elsewhere, at its own scale."""
    from sarkit.tasks import detdata

    image = torch.zeros(h, w, dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        image[y0:y1, x0:x1] = 250 - 50 * k
    item = detdata._item("s", Path("s"), w, h, boxes, [1] * len(boxes), [False] * len(boxes))
    return detdata.Cached(item, image, w, h)


def test_training_windows_hold_their_boxes_pixels():
    """Each window keeps exactly the boxes with at least half their pixels inside it, each
    lying on its own target's pixels (the flips move both alike); half the windows sit
    around a box; a scene smaller than the window is zero-padded."""
    from sarkit.tasks import detdata

    boxes = [[10, 10, 30, 24], [140, 90, 170, 120], [260, 170, 300, 200]]
    c = _scene(boxes)
    ds = detdata.WindowDataset([c], 64, 0.0, 1.0, seed=1)
    assert len(ds) == 4 * 5  # ceil(200 / 64) x ceil(300 / 64) windows cover the scene
    with_box = cut = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            x, bx, lb = ds[i]
            assert x.shape == (1, 64, 64) and len(bx) == len(lb)
            values = (x[0] * 255).round().long()
            want = []
            for k, (x0, y0, x1, y1) in enumerate(boxes):
                share = int((values == 250 - 50 * k).sum()) / ((x1 - x0) * (y1 - y0))
                cut += 0 < share < 0.5
                if share >= 0.5:
                    want.append(250 - 50 * k)
            got = []
            for x0, y0, x1, y1 in bx.round().long().tolist():
                assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
                inside = values[y0:y1, x0:x1].unique().tolist()
                assert len(inside) == 1 and inside[0] > 0  # one target's pixels, all of it
                got.append(inside[0])
            assert sorted(got) == sorted(want)
            with_box += bool(len(bx))
    assert cut > 0  # the rule was exercised: some windows cut a box to under half
    assert with_box >= 0.4 * 3 * len(ds)  # random windows alone would hit a box ~15 % of the time
    small = detdata.WindowDataset([_scene([[2, 2, 10, 10]], 40, 50)], 64, 0.0, 1.0)
    x, bx, _ = small[0]
    assert len(small) == 1 and x.shape == (1, 64, 64) and int((x > 0).sum()) == 64  # 8 x 8
    assert bx.round().tolist() in (
        [[2, 2, 10, 10]],
        [[54, 2, 62, 10]],
        [[2, 54, 10, 62]],
        [[54, 54, 62, 62]],
    )  # fmt: skip (flips take the padding along)
    x0, y0, x1, y1 = bx.round().long()[0].tolist()
    assert int((x[0, y0:y1, x0:x1] > 0).sum()) == 64


def test_whole_scene_prediction_through_overlapping_windows():
    """An oracle that boxes each window's bright blobs, cut ones included: the scene's
    detections are each target once, whole, in the file's pixels (the cached scene is at
    half scale), so mAP is 1; boxes cut by inner window edges never reach the result."""
    from scipy import ndimage

    from sarkit.tasks import detdata
    from sarkit.tasks.detect import measure

    class Blobs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images):
            out = []
            for im in images:
                lab, n = ndimage.label(im[0].numpy() > 0.1)
                found = [[s[1].start, s[0].start, s[1].stop, s[0].stop]
                         for s in ndimage.find_objects(lab)]  # fmt: skip
                b = torch.tensor(found, dtype=torch.float32).reshape(-1, 4)
                out.append({"boxes": b, "labels": torch.ones(n, dtype=torch.long),
                            "scores": torch.full((n,), 0.9)})  # fmt: skip
            return out

    # targets across the windows' seams (64 px windows, 48 px apart: seams at 48, 64, 96, ...)
    boxes = [[40, 40, 60, 56], [90, 10, 110, 30], [200, 150, 230, 170], [5, 170, 25, 195]]
    c = _scene(boxes)
    c.width, c.height = 600, 400  # the file is twice the cached scene
    c.item.boxes *= 2
    scenes = detdata.SceneSet([c], 64, 0.0, 1.0)
    found, dets = measure(Blobs(), scenes, ["ship"], batch_size=5)
    got = sorted(dets[0]["boxes"].round().astype(int).tolist())
    assert got == sorted([[2 * v for v in b] for b in boxes])
    assert found["metrics"]["map50"] == pytest.approx(1.0)


# ------------------------------------------------------------------ real data, CLI


def test_hrsid_faster_rcnn_run_folder_resume_eval_compare(cli, tmp_path):
    coco = hrsid_coco(cli, tmp_path / "hrsid")
    run = tmp_path / "run"
    args = ["finetune", "detect", "--data", coco, "-o", run, *TINY, "--epochs", "2",
            "--seed", "3", "--head", "faster_rcnn", "--layer-decay", "0.8", "--anchor-scale", "2",
            "--max-steps", "1"]  # fmt: skip
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    for name in ("config.json", "split.json", "eval.csv", "metrics.csv", "best.safetensors",
                 "last.safetensors", "results.json"):  # fmt: skip
        assert (run / name).exists(), name
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "detect" and config["init"] == {"kind": "random"}
    assert config["head"]["kind"] == "faster_rcnn" and config["head"]["classes"] == ["ship"]
    assert config["head"]["layer_decay"] == 0.8 and config["head"]["anchor_scale"] == 2.0
    assert config["options"]["lr"] == 1e-4 and config["options"]["schedule"] == "multistep"
    split = json.loads((run / "split.json").read_text())
    assert split["how"] == "seeded 4:1" and len(split["train"]) == 5 and len(split["val"]) == 1
    train_cols = open(run / "metrics.csv").readline().strip().split(",")
    assert {"loss", "loss_classifier", "loss_objectness", "loss_rpn_box_reg"} <= set(train_cols)
    # resumed to the end of 2 epochs (5 images, batch 4: 2 steps an epoch)
    proc = cli(*args[:-2], "--resume", "latest")
    assert proc.returncode == 0, proc.stderr
    rows = eval_rows(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 4]
    assert list(rows[0])[:6] == ["step", "epoch", "map50", "map", "map75", "ar100"]
    # eval on the run's own data measures its held-out image: the run's last evaluation
    proc = cli("eval", "detect", run, "--data", coco, "--drawn", "1", "--score-threshold",
               "0.01", "--batch-size", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "1 images of" in proc.stderr and "the run's held-out split" in proc.stderr
    assert "at score >= 0.01: " in proc.stderr and " false alarms, " in proc.stderr
    record = json.loads(proc.stdout)
    for key in ("map50", "map", "ar100"):
        assert record["metrics"][key] == pytest.approx(float(rows[-1][key]), abs=1e-5)
    drawn = list((run / "eval").glob("boxes_*.png"))
    assert len(drawn) == 1 and Image.open(drawn[0]).size == (800, 800)
    assert Image.open(drawn[0]).mode == "RGB"
    assert (run / "eval" / "pr_curve.png").stat().st_size > 1000
    counts = json.loads((run / "eval" / "detect_counts.json").read_text())
    truth = json.loads(coco.read_text())
    stem = Path(split["val"][0]).stem
    iid = next(i["id"] for i in truth["images"] if Path(i["file_name"]).stem == stem)
    ships = sum(1 for a in truth["annotations"] if a["image_id"] == iid)
    assert counts["found"] + counts["missed"] == ships and counts["score_threshold"] == 0.01
    # the compare table shows the detection columns
    proc = cli("eval", "--compare", run)
    assert proc.returncode == 0, proc.stderr
    assert "detect:map50" in proc.stdout + proc.stderr


def voc_folder(coco: Path, dest: Path) -> Path:
    """The COCO boxes as a VOC folder (1-based inclusive pixels), one box marked difficult,
    with an ImageSets/Main train/val split."""
    data = json.loads(coco.read_text())
    (dest / "Annotations").mkdir(parents=True)
    (dest / "JPEGImages").mkdir()
    (dest / "ImageSets" / "Main").mkdir(parents=True)
    stems = []
    for k, image in enumerate(data["images"]):
        src = (coco.parent / image["file_name"]).resolve()
        os.symlink(src, dest / "JPEGImages" / src.name)
        objects = ""
        for j, a in enumerate(a for a in data["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = a["bbox"]
            difficult = int(k == 0 and j == 0)
            objects += (f"<object><name>ship</name><difficult>{difficult}</difficult><bndbox>"
                        f"<xmin>{x + 1:g}</xmin><ymin>{y + 1:g}</ymin><xmax>{x + w:g}</xmax>"
                        f"<ymax>{y + h:g}</ymax></bndbox></object>")  # fmt: skip
        (dest / "Annotations" / f"{src.stem}.xml").write_text(
            f"<annotation><filename>{src.name}</filename><size><width>800</width>"
            f"<height>800</height><depth>3</depth></size>{objects}</annotation>"
        )
        stems.append(src.stem)
    (dest / "ImageSets" / "Main" / "train.txt").write_text("\n".join(stems[:4]) + "\n")
    (dest / "ImageSets" / "Main" / "val.txt").write_text("\n".join(stems[4:]) + "\n")
    return dest


def test_hrsid_tiled_windows_train_and_eval_whole_scenes(cli, tmp_path, monkeypatch):
    """--tile: training windows of real HRSID scenes, and the held-out scene measured whole
    (its eval equal to the run's last, boxes in the scene's 800 px frame); the tile is the
    run's, so eval reads it back. Trained with a relative --data, the run's own held-out
    split is found again by `eval detect RUN` from another folder."""
    hrsid_coco(cli, tmp_path / "hrsid", n=4)
    monkeypatch.chdir(tmp_path / "hrsid")
    coco = Path("hrsid.coco.json")
    run = tmp_path / "tiled"
    proc = cli("finetune", "detect", "--data", coco, "-o", run, *TINY, "--head", "fcos",
               "--tile", "200", "--max-steps", "2", "--fpn-channels", "64")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "(200px windows)" in proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["head"]["tile"] == 200
    rows = eval_rows(run)
    monkeypatch.chdir(tmp_path)
    proc = cli("eval", "detect", run, "--score-threshold", "0.0", "--drawn", "1")
    assert proc.returncode == 0, proc.stderr
    assert "1 images of" in proc.stderr and "the run's held-out split" in proc.stderr
    coco = tmp_path / "hrsid" / "hrsid.coco.json"
    record = json.loads(proc.stdout)
    assert record["metrics"]["map50"] == pytest.approx(float(rows[-1]["map50"]), abs=1e-5)
    drawn = list((run / "eval").glob("boxes_*.png"))
    assert len(drawn) == 1 and Image.open(drawn[0]).size == (800, 800)
    counts = json.loads((run / "eval" / "detect_counts.json").read_text())
    truth = json.loads(coco.read_text())
    stem = Path(json.loads((run / "split.json").read_text())["val"][0]).stem
    iid = next(i["id"] for i in truth["images"] if Path(i["file_name"]).stem == stem)
    ships = sum(1 for a in truth["annotations"] if a["image_id"] == iid)
    assert counts["found"] + counts["missed"] == ships  # every ship of the whole scene counted
    assert counts["score_threshold"] == 0.0 and "at score >= 0: " in proc.stderr
    proc = cli("finetune", "detect", "--data", coco, "-o", tmp_path / "bad", *TINY, "--tile", "8")
    assert proc.returncode == 2 and "window of at least 16 px" in proc.stderr


@pytest.mark.parametrize("head", ["retinanet", "fcos"])
def test_voc_folder_and_heads(cli, tmp_path, head):
    from sarkit.tasks import detdata

    coco = hrsid_coco(cli, tmp_path / "hrsid", n=5)
    voc = voc_folder(coco, tmp_path / "voc")
    data = detdata.load(str(voc))
    from_coco = detdata.load(str(coco))
    assert data.categories == ["ship"] and data.split[2] == "given (ImageSets/Main val.txt)"
    a, b = data.items[0], from_coco.items[0]
    assert np.allclose(a.boxes, b.boxes) and a.crowd[0] and not a.crowd[1:].any()
    # a sarkit run folder as the init (its export/), as pretraining writes it
    from safetensors.torch import save_file

    from sarkit.model.vision import build_vision

    init = tmp_path / "pretrained" / "export"
    init.mkdir(parents=True)
    vit = build_vision("vit_tiny_patch16_224", 32)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()},
              str(init / "vision.safetensors"))  # fmt: skip
    meta = {"timm_name": "vit_tiny_patch16_224", "img_size": 32, "mean": [0.3], "std": [0.2]}
    (init / "vision.json").write_text(json.dumps(meta))
    run = tmp_path / "run"
    if head == "fcos":  # its GroupNorm(32) cannot normalise a 1x1 stride-64 level of 32
        proc = cli("finetune", "detect", "--data", voc, "-o", run, *TINY, "--head", head)
        assert proc.returncode == 1 and "give --fpn-channels 64 or more" in proc.stderr
    held = ["--val-data", coco] if head == "fcos" else []  # COCO held out for a VOC run
    proc = cli("finetune", "detect", "--data", voc, "-o", run, *TINY, "--head", head,
               "--max-steps", "1", "--init", init.parent, "--precision", "bf16",
               "--fpn-channels", "64", *held)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["head"]["kind"] == head and config["head"]["layer_decay"] == 0.7
    assert config["init"]["kind"] == "run" and config["vision"]["mean"] == 0.3
    split = json.loads((run / "split.json").read_text())
    losses = {"retinanet": "bbox_regression", "fcos": "bbox_ctrness"}[head]
    assert losses in open(run / "metrics.csv").readline()
    assert float(eval_rows(run)[-1]["map50"]) >= 0.0
    if head == "fcos":
        assert split["how"] == "given (--val-data)" and len(split["val"]) == 5
        assert len(split["train"]) == 5
        return
    assert split["how"] == "given (ImageSets/Main val.txt)" and len(split["val"]) == 1
    # eval on the run's VOC folder: its val split; a class the run does not know is an error
    proc = cli("eval", "detect", run, "--data", voc, "--drawn", "0")
    assert proc.returncode == 0, proc.stderr
    assert "given (ImageSets/Main val.txt)" in proc.stderr
    assert not list((run / "eval").glob("boxes_*.png"))
    xml = next((voc / "Annotations").glob("*.xml"))
    xml.write_text(xml.read_text().replace("<name>ship</name>", "<name>tanker</name>", 1))
    proc = cli("eval", "detect", run, "--data", voc)
    assert proc.returncode == 1 and "classes ['tanker'] are not among the run's" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_annotations_are_counted_or_named(cli, tmp_path):
    coco = hrsid_coco(cli, tmp_path / "hrsid", n=8)
    data = json.loads(coco.read_text())
    images = data["images"]
    (tmp_path / "hrsid" / "empty.jpg").write_bytes(b"")
    images[0]["file_name"] = "images/gone.jpg"  # missing file
    images[1]["file_name"] = "empty.jpg"  # unreadable
    first = {im["id"]: next(a for a in data["annotations"] if a["image_id"] == im["id"])
             for im in images[2:5]}  # fmt: skip
    first[images[2]["id"]]["bbox"] = [790.0, 10.0, 30.0, 10.0]  # outside the 800 x 800 image
    first[images[3]["id"]]["bbox"] = [10.0, 10.0, 0.0, 5.0]  # zero area
    first[images[4]["id"]]["category_id"] = 7  # not in the categories
    data["annotations"].append({"id": 999, "image_id": 12345, "category_id": 1,
                                "bbox": [1, 1, 2, 2]})  # fmt: skip
    bad = tmp_path / "bad.coco.json"
    bad.write_text(json.dumps(data))
    os.symlink(tmp_path / "hrsid" / "images", tmp_path / "images")
    os.symlink(tmp_path / "hrsid" / "empty.jpg", tmp_path / "empty.jpg")
    run = tmp_path / "run"
    proc = cli("finetune", "detect", "--data", bad, "-o", run, *TINY, "--max-steps", "1",
               "--val-fraction", "0.34")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    err = " ".join(proc.stderr.split())
    assert "skipped 4 image(s); first: " in err and "images/gone.jpg: no such file" in err
    assert "1 annotation(s) refer to no image entry" in err
    assert "skipped 1 image(s); first: " in err and "empty.jpg" in err  # unreadable, at read
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 3
    from sarkit.tasks import detdata

    skipped = detdata.load(str(bad)).skipped
    assert len(skipped) == 4 and any("zero area" in s for s in skipped)
    assert any("box [790, 10, 820, 20] lies outside the 800x800 image" in s for s in skipped)
    assert any("category id 7 is not in the categories list" in s for s in skipped)
    assert any("gone.jpg: no such file" in s for s in skipped)
    # whole-file problems: one line naming the file, no traceback
    (tmp_path / "notjson.json").write_text("{nope")
    del data["annotations"][0]["bbox"]
    (tmp_path / "nobox.json").write_text(json.dumps(data))
    cases = [(tmp_path / "notjson.json", "not a COCO annotation file"),
             (tmp_path / "nobox.json", "lacks image_id, category_id or a 4-number bbox"),
             (tmp_path / "nowhere.json", "no such file or folder")]  # fmt: skip
    for path, message in cases:
        proc = cli("finetune", "detect", "--data", path, "-o", tmp_path / "r2", *TINY)
        assert proc.returncode == 1 and message in proc.stderr and str(path) in proc.stderr
        assert "Traceback" not in proc.stderr
    proc = cli("finetune", "detect", "--data", coco, "-o", tmp_path / "r3", *TINY[:-1], "40")
    assert proc.returncode == 2 and "a multiple of 32" in proc.stderr


@pytest.mark.slow
def test_detect_under_deepspeed(tmp_path):
    """--deepspeed: torchvision's detector (a dict of losses in training, boxes in eval) trains
    through the loop's DeepSpeed engine and is scored (its own process)."""
    pytest.importorskip("deepspeed")
    from conftest import sarkit

    coco = hrsid_coco(lambda *a, check=None: sarkit(*a, check=check), tmp_path / "h", n=4)
    run = tmp_path / "run"
    proc = sarkit("finetune", "detect", "--data", coco, "-o", run, *TINY, "--max-steps", "2",
                  "--deepspeed", "zero1", env={"DS_ACCELERATOR": "cpu"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    state = json.loads((run / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["engine"] == "deepspeed" and state["zero_stage"] == 1
    rows = eval_rows(run)
    assert rows and 0.0 <= float(rows[-1]["map50"]) <= 1.0
    assert (run / "last.safetensors").exists()
