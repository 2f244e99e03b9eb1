"""The caption/retrieval/VQA builder, checked on hand-made annotations and the real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shared
from PIL import Image

from sarkit.tasks.vl.annotations import parse_classes, read_annotations
from sarkit.tasks.vl.build import REGIONS, BuildOptions, build, caption, region_of


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def gray(path: Path, w: int = 90, h: int = 60) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), 80, np.uint8)).save(path)
    return path


@pytest.fixture
def coco(tmp_path):
    """Two 90x60 images: a.png with two ships in the upper left and one tank at the centre,
    b.png empty; plus an annotation of an image that does not exist."""
    gray(tmp_path / "img" / "a.png")
    gray(tmp_path / "img" / "b.png")
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 90, "height": 60},
            {"id": 2, "file_name": "b.png", "width": 90, "height": 60},
            {"id": 3, "file_name": "gone.png", "width": 90, "height": 60},
        ],
        "categories": [{"id": 7, "name": "ship"}, {"id": 8, "name": "tank"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 2, 10, 8]},  # centre 7,6 -> 1
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [20, 5, 6, 6]},  # 23,8 -> 1
            {"id": 3, "image_id": 1, "category_id": 8, "bbox": [40, 25, 10, 10]},  # 45,30 -> 5
            {"id": 4, "image_id": 9, "category_id": 7, "bbox": [0, 0, 5, 5]},  # no image 9
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_regions_are_numbered_row_by_row():
    w, h = 90, 60
    assert [region_of(x, y, w, h) for x, y in [(1, 1), (45, 1), (89, 1)]] == [1, 2, 3]
    assert [region_of(x, y, w, h) for x, y in [(1, 30), (45, 30), (89, 30)]] == [4, 5, 6]
    assert [region_of(x, y, w, h) for x, y in [(1, 59), (45, 59), (90, 60)]] == [7, 8, 9]
    assert REGIONS[0] == "upper left" and REGIONS[4] == "center" and REGIONS[8] == "lower right"


def test_parse_classes():
    assert parse_classes("1=bare soil,2=water") == {(1,): "bare soil", (2,): "water"}
    assert parse_classes("0,255,0=ship,255,0,0=oil") == {(0, 255, 0): "ship", (255, 0, 0): "oil"}


def test_coco_counts_regions_questions_and_problems(coco, tmp_path):
    ann = read_annotations(coco, coco.parent / "img")
    assert [i.name for i in ann.images] == ["a", "b"]
    assert any("gone.png" in p for p in ann.problems)
    assert any("no image with id 9" in p for p in ann.problems)
    out = tmp_path / "sft"
    summary = build(ann, BuildOptions(coco, out, test_fraction=0.5, seed=3))
    assert summary["problems"] == 2 and summary["objects"] == 3
    assert "main_landform" in summary["not_made"] and "landform masks" in str(summary["not_made"])
    assert summary["splits"] == {"train": 1, "test": 1}
    rows = {r["id"]: r for r in lines(out / "caption.jsonl")}
    assert lines(out / "retrieval.jsonl") == list(rows.values())
    caps = rows["a"]["captions"]
    assert len(caps) == 5 and len(set(caps)) == 5  # five templates
    for c in caps:
        c = c.lower()
        assert "two ships" in c and "upper left" in c and "one tank" in c and "center" in c
    assert all("no target" in c.lower() for c in rows["b"]["captions"])
    assert (out / rows["a"]["path"]).resolve() == (tmp_path / "img" / "a.png").resolve()
    qa = {(r["image"], r["type"], r["question"]): r["answer"] for r in lines(out / "vqa.jsonl")}
    assert qa[("a", "count", "How many ships are in the image?")] == "2"
    assert qa[("a", "count", "How many tanks are in the image?")] == "1"
    pos = {q[2]: a for q, a in qa.items() if q[0] == "a" and q[1] == "position"}
    assert sorted(pos.values()) == ["1", "5"]  # both ships in region 1, the tank in 5
    assert not any(t == "recognition" for (i, t, _) in qa if i == "a")  # two kinds: ambiguous
    assert not any(t.endswith("landform") or t == "all_landforms" for (_, t, _) in qa)
    vocab = json.loads((out / "answers.json").read_text())
    assert set(vocab["by_type"]["count"]) == {"0", "1", "2"}
    # same seed, same files; splits of every question follow their image
    again = build(ann, BuildOptions(coco, tmp_path / "sft2", test_fraction=0.5, seed=3))
    assert again == summary | {"source": again["source"]}
    assert (tmp_path / "sft2" / "vqa.jsonl").read_text() == (out / "vqa.jsonl").read_text()
    split = {r["id"]: r["split"] for r in rows.values()}
    assert all(r["split"] == split[r["image"]] for r in lines(out / "vqa.jsonl"))


def test_voc_folder(tmp_path):
    gray(tmp_path / "JPEGImages" / "x.jpg", 300, 300)
    ann_dir = tmp_path / "Annotations"
    ann_dir.mkdir()
    (ann_dir / "x.xml").write_text(
        "<annotation><filename>x.jpg</filename><size><width>300</width><height>300</height>"
        "</size><object><name>ship</name><bndbox><xmin>250</xmin><ymin>250</ymin>"
        "<xmax>290</xmax><ymax>280</ymax></bndbox></object>"
        "<object><name>ship</name><bndbox><xmin>10</xmin></bndbox></object></annotation>"
    )
    ann = read_annotations(ann_dir)
    assert ann.kind == "voc" and len(ann.images[0].objects) == 1
    assert any("no complete bndbox" in p for p in ann.problems)
    summary = build(ann, BuildOptions(ann_dir, tmp_path / "o", tasks=("vqa",)))
    assert summary["written"] == {"vqa": 3}
    qa = {r["type"]: r["answer"] for r in lines(tmp_path / "o" / "vqa.jsonl")}
    assert qa == {"count": "1", "recognition": "ship", "position": "9"}


def test_index_masks_give_landform_questions(tmp_path):
    """A 90x90 index mask: water (3) on the left two thirds, urban (4) on the right third,
    value 0 unlabelled in the upper left cell; plus one colour-mask object source."""
    mask = np.full((90, 90), 3, np.uint8)
    mask[:, 60:] = 4
    mask[:30, :30] = 0
    (tmp_path / "m").mkdir()
    Image.fromarray(mask).save(tmp_path / "m" / "t.png")
    gray(tmp_path / "img" / "t.png", 90, 90)
    ann = read_annotations(tmp_path / "m", tmp_path / "img", "3=water,4=urban")
    summary = build(ann, BuildOptions(tmp_path / "m", tmp_path / "o", region_questions=9))
    assert summary["landforms"] == ["water", "urban"]
    assert "count" in summary["not_made"]
    qa = lines(tmp_path / "o" / "vqa.jsonl")
    by = {}
    for r in qa:
        by.setdefault(r["type"], []).append((r["question"], r["answer"]))
    assert by["main_landform"] == [("What is the main landform in the image?", "water")]
    assert by["all_landforms"][0][1] == "urban, water"
    region = dict(by["region_landform"])
    assert len(region) == 8  # the unlabelled upper left cell is not asked about
    assert region["What is the main landform in the upper right region?"] == "urban"
    assert region["What is the main landform in the center region?"] == "water"
    cap = lines(tmp_path / "o" / "caption.jsonl")[0]["captions"][0]
    assert "water" in cap and "urban" in cap
    # fewer questions than regions: those whose cover is not the main landform come first
    for seed in range(5):
        build(ann, BuildOptions(tmp_path / "m", tmp_path / f"o{seed}", region_questions=2,
                                seed=seed))  # fmt: skip
        asked = [r for r in lines(tmp_path / f"o{seed}" / "vqa.jsonl")
                 if r["type"] == "region_landform"]  # fmt: skip
        assert len(asked) == 2 and {r["answer"] for r in asked} == {"urban"}
    build(ann, BuildOptions(tmp_path / "m", tmp_path / "o5", region_questions=4))
    asked = [r["answer"] for r in lines(tmp_path / "o5" / "vqa.jsonl")
             if r["type"] == "region_landform"]  # fmt: skip
    assert sorted(asked) == ["urban", "urban", "urban", "water"]  # then the main landform's


def test_colour_mask_objects_are_connected_components(tmp_path):
    mask = np.zeros((60, 60, 3), np.uint8)
    mask[2:6, 2:6] = (0, 255, 0)  # region 1
    mask[50:55, 50:58] = (0, 255, 0)  # region 9
    (tmp_path / "m").mkdir()
    Image.fromarray(mask).save(tmp_path / "m" / "s.png")
    gray(tmp_path / "img" / "s.jpg", 60, 60)
    ann = read_annotations(tmp_path / "m", tmp_path / "img", "0,255,0=ship", "ship")
    boxes = sorted(o.box for o in ann.images[0].objects)
    assert boxes == [(2, 2, 6, 6), (50, 50, 58, 55)]
    assert "two ships in the upper left and lower right regions" in caption(ann.images[0], 0, True)


def test_bad_sources_are_named(tmp_path):
    from sarkit.errors import SarkitError, UsageError

    with pytest.raises(SarkitError, match="no such file"):
        read_annotations(tmp_path / "nope.json")
    (tmp_path / "m").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "m" / "a.png")
    with pytest.raises(UsageError, match="--classes"):
        read_annotations(tmp_path / "m")
    with pytest.raises(UsageError, match="not among"):
        read_annotations(tmp_path / "m", tmp_path, "1=water", "ship")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(SarkitError, match="not a COCO"):
        read_annotations(bad)


def test_real_hrsid_and_polsf(tmp_path):
    hrsid = shared("hrsid_mini")
    ann = read_annotations(hrsid / "masks", hrsid / "images", "0,255,0=ship", "ship")
    s = build(ann, BuildOptions(hrsid / "masks", tmp_path / "h"))
    assert s["images"] == 36 and s["problems"] == 0 and s["objects"] >= 36
    assert s["splits"] == {"train": 29, "test": 7}
    assert set(s["questions"]) == {"count", "recognition", "position"}
    assert "all_landforms" in s["not_made"]
    polsf = shared("polsf_airsar")
    classes = "1=bare soil,2=mountain,3=water,4=urban,5=vegetation"
    ann = read_annotations(polsf / "masks", polsf / "images", classes)
    s = build(ann, BuildOptions(polsf / "masks", tmp_path / "p"))
    assert s["images"] == 56 and s["questions"]["main_landform"] == 56
    # the builder's main landform agrees with the shipped per-tile pixel counts
    import csv

    names = classes.split(",")
    with open(polsf / "tiles.csv") as fh:
        truth = {}
        for row in csv.DictReader(fh):
            counts = [int(row[f"px_{k}"]) for k in range(1, 6)]
            truth[row["name"]] = names[int(np.argmax(counts))].split("=")[1]
    qa = lines(tmp_path / "p" / "vqa.jsonl")
    got = {r["image"]: r["answer"] for r in qa if r["type"] == "main_landform"}
    assert got == truth


def test_a_test_list_that_names_no_image_is_refused(tmp_path, capsys):
    """Class-folder images are named '<class>/<stem>': a list of bare stems matched none of
    them and put every image in train without a word."""
    from sarkit.errors import SarkitError

    for name in ("0/a.png", "0/b.png", "1/c.png"):
        gray(tmp_path / "cls" / name)
    ann = read_annotations(tmp_path / "cls")
    listed = tmp_path / "test.txt"
    listed.write_text("a\nc\n")
    options = BuildOptions(tmp_path / "cls", tmp_path / "o", tasks=("vqa",), test_list=listed)
    with pytest.raises(SarkitError, match=r"none of its 2 name\(s\).*look like '0/a'"):
        build(ann, options)
    assert not (tmp_path / "o").exists()
    listed.write_text("0/a\n1/c\n1/gone\n")
    summary = build(ann, options)
    assert "1 of its 3 name(s) are no image" in capsys.readouterr().err
    split = {r["image"]: r["split"] for r in lines(tmp_path / "o" / "vqa.jsonl")}
    assert split == {"0/a": "test", "0/b": "train", "1/c": "test"}, summary
