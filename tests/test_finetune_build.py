"""`sarkit finetune build --boxes-from-masks`: COCO boxes from HRSID's ship masks; the head
and builder registries and the `finetune`/`eval` command groups."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import shared
from PIL import Image


def test_hrsid_masks_to_coco(cli, tmp_path):
    from scipy import ndimage

    root = shared("hrsid_mini")
    out = tmp_path / "hrsid.coco.json"
    proc = cli("finetune", "build", "--boxes-from-masks", root, "-o", out, "--min-area", "1")
    assert proc.returncode == 0, proc.stderr
    coco = json.loads(out.read_text())
    assert len(coco["images"]) == 36 and coco["categories"] == [
        {"id": 1, "name": "ship", "supercategory": "ship"}
    ]
    # every box is one 8-connected component of green pixels of its mask
    total = 0
    for image in coco["images"]:
        path = (tmp_path / image["file_name"]).resolve()
        assert path.exists() and (image["width"], image["height"]) == (800, 800)
        mask = np.asarray(Image.open(root / "masks" / (path.stem + ".png")))[..., 1] > 127
        _, n = ndimage.label(mask, structure=np.ones((3, 3)))
        boxes = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert len(boxes) == n
        total += n
        for a in boxes:
            x, y, w, h = map(int, a["bbox"])
            assert w > 0 and h > 0 and x + w <= 800 and y + h <= 800
            assert 0 < a["area"] <= w * h and mask[y : y + h, x : x + w].sum() >= a["area"]
    assert total == len(coco["annotations"]) > 36
    # the default leaves speckle under 4 px out, and says so
    proc = cli("finetune", "build", "--boxes-from-masks", root, "-o", out)
    assert proc.returncode == 0 and "ship boxes" in proc.stderr
    assert len(json.loads(out.read_text())["annotations"]) <= total


def test_bad_masks_are_skipped_and_named(cli, tmp_path):
    (tmp_path / "masks").mkdir()
    (tmp_path / "images").mkdir()
    good = np.zeros((20, 30, 3), np.uint8)
    good[2:6, 3:9, 1] = 255  # one 6x4 ship
    good[10:12, 20:21, 1] = 255  # a 1x2 speck
    Image.fromarray(good).save(tmp_path / "masks" / "a.png")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "images" / "a.jpg")
    red = good.copy()
    red[0, 0] = (255, 0, 0)
    Image.fromarray(red).save(tmp_path / "masks" / "b.png")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "images" / "b.jpg")
    Image.fromarray(good).save(tmp_path / "masks" / "c.png")  # wrong size for its image
    Image.fromarray(np.zeros((21, 30), np.uint8)).save(tmp_path / "images" / "c.jpg")
    Image.fromarray(good).save(tmp_path / "masks" / "d.png")  # no image at all
    out = tmp_path / "x.coco.json"
    proc = cli("finetune", "build", "--boxes-from-masks", tmp_path / "masks", "--images",
               tmp_path / "images", "-o", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        "skipped 3 mask(s)" in proc.stderr and "b.png: pixel (0, 0) is (255, 0, 0)" in proc.stderr
    )
    coco = json.loads(out.read_text())
    assert [i["file_name"] for i in coco["images"]] == ["images/a.jpg"]
    assert [a["bbox"] for a in coco["annotations"]] == [[3.0, 2.0, 6.0, 4.0]]
    assert coco["annotations"][0]["area"] == 24.0
    assert "1 components under 4 px left out" in proc.stderr
    # nothing usable: an error naming why, no output
    (tmp_path / "masks" / "a.png").unlink()
    out.unlink()
    proc = cli("finetune", "build", "--boxes-from-masks", tmp_path, "-o", out)
    assert proc.returncode == 1 and "no usable mask" in proc.stderr and not out.exists()
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["finetune", "build", "-o", "x.json"], 2, "needs one of --boxes-from-masks"),
        (["finetune", "nosuchtask"], 2, "No such command 'nosuchtask'"),
        (["eval", "--compare"], 2, "needs at least one run folder"),
        (["eval", "--compare", "nowhere"], 1, "nowhere: not a run folder"),
        (["finetune", "build", "--boxes-from-masks", "nowhere", "-o", "x.json"], 1, "not a folder"),
    ],
)
def test_usage_errors(cli, tmp_path, args, code, message):
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_plugin_head_replaces_a_builtin_and_lists(cli):
    from sarkit import plugins
    from sarkit.hookspecs import DataBuilder, HeadOption, TaskHead
    from sarkit.tasks import registry

    class Head:
        name = "classify"
        summary = "a third-party classifier"
        primary = "top1"
        defaults = {"lr": 1.0}
        options = (HeadOption("--mine", "mine"),)

        def prepare(self, options):
            return None

        def evaluate(self, run, options):
            return None

        def figures(self, result, folder):
            return []

    class Plugin:
        @plugins.hookimpl
        def sarkit_task_heads(self):
            return [Head()]

    plugins.reset()
    try:
        pm = plugins.get_manager()
        builtin = registry.heads().get("classify")
        pm.register(Plugin(), name="third-party")
        assert registry.head("classify").summary == "a third-party classifier"
        assert isinstance(registry.head("classify"), TaskHead)
        assert builtin is None or isinstance(builtin, TaskHead)
        assert all(isinstance(b, DataBuilder) for b in registry.builders().values())
        with pytest.raises(Exception, match="unknown task 'nope'"):
            registry.head("nope")
    finally:
        plugins.reset()
    proc = cli("finetune", "--help")
    assert proc.returncode == 0 and "build" in proc.stderr + proc.stdout
