"""`sarkit finetune classify` / `sarkit eval classify` / `eval --compare` on real MSTAR chips
(a few per class, tiny ViT), and their bad inputs."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import shared

CLASSES = ("0", "3", "7")
TINY = [
    "--vision", "vit_tiny_patch16_224", "--image-size", "32", "--batch-size", "8",
    "--workers", "0", "--log-every", "1", "--warmup-steps", "1", "--lr", "1e-3",
]  # fmt: skip


@pytest.fixture
def cli(cli_in_process):
    return cli_in_process


def mstar_folders(dest: Path, train: int = 8, val: int = 4) -> Path:
    """DEST/train/<c>/ and DEST/val/<c>/ with links to real MSTAR chips."""
    root = shared("mstar")
    for split, n in (("train", train), ("val", val)):
        for c in CLASSES:
            (dest / split / c).mkdir(parents=True)
            for src in sorted((root / split / c).iterdir())[:n]:
                os.symlink(src, dest / split / c / src.name)
    return dest


def real_chip(split: str, label: str, n: int = 0):
    """The n-th MSTAR chip of a class folder, as uint8 pixels."""
    import numpy as np
    from PIL import Image

    path = sorted((shared("mstar") / split / label).iterdir())[n]
    return np.asarray(Image.open(path).convert("L"))


def eval_rows(run: Path) -> list[dict]:
    with open(run / "eval.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def assert_eval_rebuilds(cli, run: Path, data: Path) -> None:
    """`eval classify` rebuilds the run's network: its top-1 is the run's last evaluation."""
    proc = cli("eval", "classify", run, "--data", data)
    assert proc.returncode == 0, proc.stderr
    top1 = float(eval_rows(run)[-1]["top1"])
    assert json.loads(proc.stdout)["metrics"]["top1"] == pytest.approx(top1, abs=1e-5)


def test_classify_run_folder_resume_eval(cli, tmp_path):
    data = mstar_folders(tmp_path / "data")
    run = tmp_path / "run"
    args = ["finetune", "classify", "--data", data, "-o", run, *TINY, "--init", "random",
            "--epochs", "2", "--seed", "3", "--grad-accum", "1", "--weight-decay", "0.05",
            "--drop-path", "0.0", "--precision", "bf16", "--save-every", "2",
            "--pool", "cls", "--label-smoothing", "0.1", "--layer-decay", "0.8",
            "--center-crop", "0.6875", "--max-steps", "4"]  # fmt: skip
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    for name in ("config.json", "split.json", "eval.csv", "metrics.csv", "best.safetensors",
                 "last.safetensors", "results.json", "best.json"):  # fmt: skip
        assert (run / name).exists(), name
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "classify" and config["init"] == {"kind": "random"}
    assert config["head"]["classes"] == list(CLASSES) and config["head"]["pool"] == "cls"
    assert config["vision"]["center_crop"] == 0.6875 and config["options"]["precision"] == "bf16"
    split = json.loads((run / "split.json").read_text())
    assert split["how"] == "given" and len(split["train"]) == 24 and len(split["val"]) == 12
    assert len(eval_rows(run)) == 2  # 24 images / batch 8 = 3 steps an epoch; stopped at 4
    # resumed to the end of 3 epochs: one more evaluation per epoch, settled over all of them
    proc = cli(*args[:-2], "--epochs", "3", "--resume", "latest")
    assert proc.returncode == 0, proc.stderr
    rows = eval_rows(run)
    assert [int(r["step"]) for r in rows] == [3, 4, 6, 9]
    assert [int(r["epoch"]) for r in rows] == [1, 1, 2, 3]  # the last step ends epoch 3
    results = json.loads((run / "results.json").read_text())
    assert results["settled_over"] == 4
    assert results["settled"]["top1"] == pytest.approx(
        sum(float(r["top1"]) for r in rows) / 4, abs=1e-5
    )
    # eval reloads the last weights: the same held-out top-1 as the run's last evaluation
    figures = tmp_path / "fig"
    proc = cli("eval", "classify", run, "--data", data, "--weights", "last", "--batch-size", "5",
               "--workers", "0", "--precision", "fp32", "--figures", figures)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["metrics"]["top1"] == pytest.approx(float(rows[-1]["top1"]), abs=1e-5)
    assert set(record["metrics"]) == {"top1", "top3", "mean_class_acc"}
    # the per-class rows reach stderr and the record, one per class
    per_class = dict(record["table"])
    assert set(per_class) == {f"acc {c}" for c in CLASSES}
    for c in CLASSES:
        assert f"acc {c}" in proc.stderr and 0.0 <= float(per_class[f"acc {c}"]) <= 1.0
    assert (figures / "confusion.png").stat().st_size > 1000
    per_class = json.loads((figures / "per_class.json").read_text())
    assert sorted(per_class) == list(CLASSES)
    assert sum(per_class.values()) / 3 == pytest.approx(record["metrics"]["mean_class_acc"])
    assert (figures / "classify.json").exists()

    # bad input: other classes, a run of another task, not a run
    other = tmp_path / "other"
    (other / "9").mkdir(parents=True)
    os.symlink(next((data / "train" / "0").iterdir()), other / "9" / "a.jpeg")
    proc = cli("eval", "classify", run, "--data", other, "--weights", "best")
    assert proc.returncode == 1 and "classes ['9'] are not among the run's 3" in proc.stderr
    proc = cli("eval", "classify", tmp_path, "--data", data)
    assert proc.returncode == 1 and "config.json: missing" in proc.stderr

    # --compare: Table 4 layout (settled metrics from results.json), best bold
    run2 = tmp_path / "run2"
    cli("finetune", "classify", "--data", data, "-o", run2, *TINY, "--epochs", "1",
        "--init", "random", "--max-steps", "1", check=0)  # fmt: skip
    md, table = tmp_path / "t.md", tmp_path / "t.csv"
    proc = cli("eval", "--compare", run, run2, "--markdown", md, "--csv", table)
    assert proc.returncode == 0, proc.stderr
    cells = json.loads(proc.stdout)
    assert cells["random"]["classify:top1"] == pytest.approx(results["settled"]["top1"])
    settled2 = json.loads((run2 / "results.json").read_text())["settled"]["top1"]
    assert cells["random (run2)"]["classify:top1"] == pytest.approx(settled2)
    text = md.read_text()
    assert text.startswith("| init | classify:top1") and "| random (run2) |" in text
    assert ("**" in text) == (cells["random"]["classify:top1"] != settled2)
    assert table.read_text().splitlines()[0].startswith("init,classify:top1")


def test_init_file_and_run_folder_are_loaded(cli, tmp_path):
    """--init FILE and --init RUN start from those weights (lr ~0: they come out unchanged)."""
    import timm
    import torch
    from safetensors.torch import load_file, save_file

    data = mstar_folders(tmp_path / "data", train=3, val=1)
    vit = timm.create_model("vit_tiny_patch16_224", in_chans=1, num_classes=0, img_size=32)
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    weights = tmp_path / "w.safetensors"
    save_file(state, str(weights))
    pre = tmp_path / "pre"
    (pre / "export").mkdir(parents=True)
    save_file(state, str(pre / "export" / "vision.safetensors"))
    meta = {"timm_name": "vit_tiny_patch16_224", "model_args": {}, "img_size": 32,
            "center_crop": 0.5, "mean": [0.2], "std": [0.1]}  # fmt: skip
    (pre / "export" / "vision.json").write_text(json.dumps(meta))
    for init, kind in ((weights, "file"), (pre, "run")):
        run = tmp_path / f"ft-{kind}"
        proc = cli("finetune", "classify", "--data", data, "-o", run, *TINY, "--lr", "1e-12",
                   "--warmup-steps", "0", "--epochs", "1", "--max-steps", "1", "--init", init,
                   "--drop-path", "0")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        config = json.loads((run / "config.json").read_text())
        assert config["init"]["kind"] == kind and len(config["init"]["sha256"]) == 64
        last = load_file(str(run / "last.safetensors"))
        for key in ("patch_embed.proj.weight", "blocks.11.mlp.fc2.weight", "pos_embed"):
            assert torch.allclose(last[f"backbone.{key}"], state[key], atol=1e-6), key
        assert config["head"]["layer_decay"] == 0.75
    assert config["vision"]["mean"] == 0.2 and config["vision"]["center_crop"] == 0.5


def test_bad_data_is_named(cli, tmp_path):
    data = mstar_folders(tmp_path / "data", train=3, val=1)
    (data / "train" / "0" / "broken.jpeg").write_bytes(b"not a jpeg")
    run = tmp_path / "run"
    args = ("finetune", "classify", "-o", run, *TINY, "--epochs", "1", "--max-steps", "1")
    proc = cli(*args, "--data", data / "train", "--val-data", data / "val")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 unreadable image(s); first: " in proc.stderr and "broken.jpeg" in proc.stderr
    assert json.loads((run / "split.json").read_text())["how"] == "given"
    assert len(json.loads((run / "split.json").read_text())["train"]) == 9
    # the bad cases each into a fresh folder (a folder holding a run is refused first)
    args = ("finetune", "classify", "-o", tmp_path / "bad", *TINY, "--epochs", "1")
    for flag, value, message in (
        ("--lr", "nan", "not in the range"),
        ("--label-smoothing", "2", "not in the range"),
        ("--init", "timm:", "needs a timm model name"),
        ("--init", "nowhere", "not a run folder, a weights file"),
    ):
        proc = cli(*args, "--data", data, flag, value)
        assert proc.returncode == 2 and message in proc.stderr, (flag, proc.stderr)
    (data / "train" / "5").mkdir()
    proc = cli(*args, "--data", data)
    assert proc.returncode == 1 and "train/5: empty class folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad_csv = tmp_path / "x.csv"
    bad_csv.write_text("path,label\na.jpeg\n")
    proc = cli(*args, "--data", bad_csv)
    assert proc.returncode == 1 and "x.csv:2: expected 'path,label'" in proc.stderr


def test_seeded_split_from_one_folder_csv_and_records(cli, tmp_path):
    """No split given: a seeded, stratified 4:1 split; a CSV and records work as data."""
    from sarkit.tasks import labels
    from sarkit.tasks.splits import seeded_split

    data = mstar_folders(tmp_path / "data", train=10, val=1)
    one = data / "train"
    items = labels.load(str(one)).train
    train, val = seeded_split(items, 0.2, 7)
    assert len(val) == 6 and len(train) == 24 and not set(train) & set(val)
    assert sorted(c for _, c in val) == sorted(CLASSES * 2)
    assert seeded_split(items, 0.2, 7) == (train, val) and seeded_split(items, 0.2, 8) != (
        train,
        val,
    )
    table = tmp_path / "d.csv"
    table.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in items))
    records = tmp_path / "d.jsonl"
    records.write_text("".join(json.dumps({"path": str(p), "label": c}) + "\n" for p, c in items))
    assert labels.load(str(table)).train == labels.load(str(records)).train == items
    run = tmp_path / "run"
    proc = cli("finetune", "classify", "--data", table, "-o", run, *TINY, "--epochs", "1",
               "--max-steps", "1", "--val-fraction", "0.25")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    split = json.loads((run / "split.json").read_text())
    assert split["how"] == "seeded 3:1" and len(split["val"]) == 6  # round(2.5) = 2 a class


@pytest.mark.slow
def test_classify_under_deepspeed(tmp_path):
    """--deepspeed: the head trains through the loop's DeepSpeed engine (its own process)."""
    pytest.importorskip("deepspeed")
    from conftest import sarkit

    data = mstar_folders(tmp_path / "data", train=2, val=1)
    run = tmp_path / "run"
    proc = sarkit("finetune", "classify", "--data", data, "-o", run, *TINY, "--epochs", "1",
                  "--max-steps", "1", "--deepspeed", "zero1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        json.loads((run / "checkpoints" / "step-00000001" / "state.json").read_text())["engine"]
        == "deepspeed"
    )
    assert (run / "last.safetensors").exists() and len(eval_rows(run)) == 1


def test_vision_args_shape_the_backbone(cli, tmp_path):
    """--vision-args reach timm (a hybrid ViT's patch size on its stem, the depth), are kept
    in config.json so eval rebuilds the same network, and bad ones are named."""
    from safetensors.torch import load_file

    data = mstar_folders(tmp_path / "data", train=3, val=2)
    run = tmp_path / "run"
    args = ["finetune", "classify", "--data", data, *TINY, "--vision", "vit_tiny_r_s16_p8_224",
            "--epochs", "1", "--max-steps", "1"]  # fmt: skip
    proc = cli(*args, "-o", run, "--vision-args", "patch_size=2,depth=1")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["vision"]["model_args"] == {"patch_size": 2, "depth": 1}
    last = load_file(str(run / "last.safetensors"))
    # 32 px: the stride-4 stem gives 8x8, 2x2 patches a 4x4 grid (+ the class token)
    assert last["backbone.pos_embed"].shape == (1, 17, 192)
    assert last["backbone.patch_embed.proj.weight"].shape[-2:] == (2, 2)
    assert any(k.startswith("backbone.blocks.0.") for k in last)
    assert not any(k.startswith("backbone.blocks.1.") for k in last)
    assert_eval_rebuilds(cli, run, data)
    # a grid the stem cannot give (8 / 3), a run folder with its own architecture
    proc = cli(*args, "-o", tmp_path / "bad", "--vision-args", "patch_size=3")
    assert proc.returncode == 1 and "timm cannot build 'vit_tiny_r_s16_p8_224'" in proc.stderr
    assert "Traceback" not in proc.stderr
    pre = tmp_path / "pre"
    (pre / "export").mkdir(parents=True)
    (pre / "export" / "vision.json").write_text("{}")
    (pre / "export" / "vision.safetensors").write_bytes(b"")
    proc = cli(*args, "-o", tmp_path / "bad2", "--init", pre, "--vision-args", "depth=1")
    assert proc.returncode == 2 and "a run folder fixes its backbone" in proc.stderr
    proc = cli(*args, "-o", tmp_path / "bad3", "--vision-args", "depth")
    assert proc.returncode == 2 and "'depth' is not key=value" in proc.stderr


def test_pretrain_vision_args_carry_into_the_fine_tune(cli, tmp_path):
    """`pretrain --vision-args` builds that ViT and records it in export/vision.json; a
    fine-tune from the run rebuilds the same network and loads its weights."""
    import torch
    from conftest import tiny_bert
    from safetensors.torch import load_file
    from test_pretrain_data import mstar_records, write_jsonl

    records = write_jsonl(tmp_path / "r.jsonl", mstar_records(shared("mstar"), "train", 1))
    pre = tmp_path / "pre"
    proc = cli("pretrain", records, "-o", pre, "--vision", "vit_tiny_r_s16_p8_224",
               "--vision-args", "patch_size=2,depth=1", "--image-size", "32",
               "--text-layers", "1", "--max-tokens", "24", "--embed-dim", "16",
               "--queue-size", "8", "--batch-size", "4", "--max-steps", "1", "--workers", "0",
               "--text", str(tiny_bert()))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((pre / "export" / "vision.json").read_text())
    assert meta["model_args"] == {"patch_size": 2, "depth": 1}
    data = mstar_folders(tmp_path / "data", train=2, val=1)
    run = tmp_path / "ft"
    proc = cli("finetune", "classify", "--data", data, "-o", run, *TINY, "--init", pre,
               "--epochs", "1", "--max-steps", "1", "--lr", "1e-12", "--warmup-steps", "0",
               "--drop-path", "0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "config.json").read_text())["vision"]["model_args"] == {
        "patch_size": 2,
        "depth": 1,
    }
    exported = load_file(str(pre / "export" / "vision.safetensors"))
    last = load_file(str(run / "last.safetensors"))
    for key in ("patch_embed.backbone.conv.weight", "patch_embed.proj.weight"):
        assert torch.allclose(last[f"backbone.{key}"], exported[key], atol=1e-6), key


def test_conv_stem_vit_trains_evaluates_and_carries_from_pretrain(cli, tmp_path):
    """`--vision vitc_tiny` (timm's ViT on sarkit's registered 3x3-conv + BatchNorm stem):
    the stem's stride is `patch_size`; eval rebuilds it and reads the BatchNorm statistics
    back (its top-1 equals the run's last evaluation); a pretrain run exports it and a
    fine-tune from that run starts from those weights; a stride that is no power of two is
    named."""
    import torch
    from conftest import tiny_bert
    from safetensors.torch import load_file
    from test_pretrain_data import mstar_records, write_jsonl

    data = mstar_folders(tmp_path / "data", train=3, val=2)
    run = tmp_path / "run"
    args = ["finetune", "classify", "--data", data, *TINY, "--vision", "vitc_tiny",
            "--epochs", "1", "--max-steps", "2", "--center-crop", "0.6875"]  # fmt: skip
    proc = cli(*args, "-o", run, "--vision-args", "patch_size=8,depth=1,stem_width=8")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["vision"]["timm_name"] == "vitc_tiny"
    assert config["vision"]["model_args"] == {"patch_size": 8, "depth": 1, "stem_width": 8}
    last = load_file(str(run / "last.safetensors"))
    # 32 px, three stride-2 convolutions (8, 16, 32 channels): a 4x4 grid + the class token
    assert last["backbone.pos_embed"].shape == (1, 17, 192)
    assert last["backbone.patch_embed.stem.6.weight"].shape == (32, 16, 3, 3)
    assert last["backbone.patch_embed.proj.weight"].shape == (192, 32, 1, 1)
    bn_mean = last["backbone.patch_embed.stem.1.running_mean"]
    assert bn_mean.abs().sum() > 0  # the statistics trained and were saved
    assert not any(k.startswith("backbone.blocks.1.") for k in last)
    assert_eval_rebuilds(cli, run, data)
    proc = cli(*args, "-o", tmp_path / "bad", "--vision-args", "patch_size=6")
    assert proc.returncode == 1 and "power of two" in proc.stderr
    assert "Traceback" not in proc.stderr

    records = write_jsonl(tmp_path / "r.jsonl", mstar_records(shared("mstar"), "train", 1))
    pre = tmp_path / "pre"
    proc = cli("pretrain", records, "-o", pre, "--vision", "vitc_tiny",
               "--vision-args", "patch_size=8,depth=1,stem_width=8", "--image-size", "32",
               "--text-layers", "1", "--max-tokens", "24", "--embed-dim", "16",
               "--queue-size", "8", "--batch-size", "4", "--max-steps", "1", "--workers", "0",
               "--text", str(tiny_bert()))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    exported = load_file(str(pre / "export" / "vision.safetensors"))
    assert "patch_embed.stem.1.running_var" in exported  # BatchNorm statistics are exported
    ft = tmp_path / "ft"
    proc = cli("finetune", "classify", "--data", data, "-o", ft, *TINY, "--init", pre,
               "--epochs", "1", "--max-steps", "1", "--lr", "1e-12", "--warmup-steps", "0",
               "--drop-path", "0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((ft / "config.json").read_text())["vision"]["timm_name"] == "vitc_tiny"
    last = load_file(str(ft / "last.safetensors"))
    # (not the BatchNorm statistics: the one training step moves them, whatever the lr)
    for key in ("patch_embed.stem.0.weight", "patch_embed.proj.weight", "blocks.0.norm1.weight"):
        assert torch.allclose(last[f"backbone.{key}"], exported[key], atol=1e-6), key


def test_conv_stem_depth_adds_stride_one_convolutions():
    """`stem_depth=2`: each stage is a stride-2 and a stride-1 3x3 convolution (BatchNorm,
    ReLU), so a stride-4 stem has four convolutions and the same token grid; 0 is named."""
    import timm
    import torch

    import sarkit.model.convstem  # noqa: F401  (registers the models)

    model = timm.create_model("vitc_tiny", in_chans=1, img_size=32, patch_size=4, depth=1,
                              stem_width=8, stem_depth=2, num_classes=3)  # fmt: skip
    convs = [m for m in model.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [(8, 2), (8, 1), (16, 2), (16, 1)]
    assert model.patch_embed.grid_size == (8, 8)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="stem_depth is >= 1"):
        timm.create_model("vitc_tiny", in_chans=1, img_size=32, stem_depth=0)


def test_conv_stem_pool_and_kernel_keys():
    """`stem_pool=1`: every convolution stride 1 and a 2x2 max-pool ends each stage (the same
    token grid, an odd side rounding up as a stride-2 conv's); `stem_kernel=5`: 5x5
    convolutions with "same" padding; an even kernel is named."""
    import timm
    import torch

    import sarkit.model.convstem  # noqa: F401  (registers the models)

    model = timm.create_model("vitc_tiny", in_chans=1, img_size=22, patch_size=4, depth=1,
                              stem_width=4, stem_pool=1, stem_kernel=5, num_classes=3)  # fmt: skip
    convs = [m for m in model.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in model.patch_embed.stem if isinstance(m, torch.nn.MaxPool2d)]
    assert [(c.kernel_size[0], c.stride[0]) for c in convs] == [(5, 1), (5, 1)]
    assert len(pools) == 2
    assert model.patch_embed.grid_size == (6, 6)  # 22 -> 11 -> 6
    assert model.patch_embed.stem(torch.zeros(1, 1, 22, 22)).shape[-2:] == (6, 6)
    assert model(torch.zeros(2, 1, 22, 22)).shape == (2, 3)
    with pytest.raises(ValueError, match="stem_kernel is odd"):
        timm.create_model("vitc_tiny", in_chans=1, img_size=32, stem_kernel=4)


def test_ema_weights_are_measured_saved_and_rebuilt(cli, tmp_path):
    """`--ema`: the moving average is what each epoch measures and what best/last hold (its
    BatchNorm statistics the live model's), eval rebuilds it from config.json with the new
    stem keys, and a resumed run ends on the same averaged weights as an uninterrupted one."""
    import torch
    from safetensors.torch import load_file

    data = mstar_folders(tmp_path / "data", train=3, val=2)
    args = ["finetune", "classify", "--data", data, *TINY, "--vision", "vitc_tiny",
            "--vision-args", "patch_size=4,depth=1,stem_width=4,stem_pool=1,stem_kernel=5",
            "--epochs", "2", "--ema", "0.9", "--drop-path", "0"]  # fmt: skip
    run = tmp_path / "run"
    proc = cli(*args, "-o", run)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["ema"] == 0.9
    assert config["vision"]["model_args"]["stem_pool"] == 1
    assert len(eval_rows(run)) == 2
    assert_eval_rebuilds(cli, run, data)  # the last evaluation measured the saved average
    last = load_file(str(run / "last.safetensors"))
    live = load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))
    key = "backbone.patch_embed.proj.weight"
    assert not torch.allclose(last[key], live[key])  # the average, not the live weights
    bn = "backbone.patch_embed.stem.1.running_mean"
    assert torch.equal(last[bn], live[bn])  # statistics copied, not averaged

    # a checkpoint carries the average with every step folded in, and a resume goes on from it
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    state = load_file(str(ckpt / "task.safetensors"))
    assert int(state["ema._updates"]) == 4  # 3 chips x 3 classes / batch 8: 2 steps x 2 epochs
    assert torch.equal(state[f"ema.{key}"], last[key])
    # resumed from the checkpoint at the end of epoch 1 (the run's copy without the last one):
    # the same averaged weights at the end as the uninterrupted run's
    proc = cli(*args, "-o", tmp_path / "every", "--save-every", "2")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_file(str(tmp_path / "every" / "last.safetensors"))[key], last[key])
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "every", part)
    shutil.rmtree(part / "checkpoints" / "step-00000004")
    assert int(load_file(str(part / "checkpoints" / "step-00000002" / "task.safetensors"))
               ["ema._updates"]) == 2  # fmt: skip
    step2 = part / "checkpoints" / "step-00000002"
    proc = cli(*args, "-o", part, "--save-every", "2", "--resume", step2)
    assert proc.returncode == 0, proc.stderr
    resumed = load_file(str(part / "last.safetensors"))
    assert all(torch.allclose(resumed[k], last[k], atol=1e-6) for k in last)


def test_range_stretch_scales_rows_only_on_a_real_chip():
    """`--range-stretch`: a training view is the chip's window of side/factor rows and side
    columns resized to the model's size (checked pixel for pixel against the same window cut
    by hand); evaluation views and a stretch of 0 are the plain centred / translated crops."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from sarkit.tasks.images import ChipDataset

    chip = real_chip("train", "7")
    assert chip.shape == (128, 128)
    s = 0.15
    stretched = ChipDataset([chip] * 40, [0] * 40, 88, 0.6875, 0.0, 1.0, train=True, stretch=s)
    plain = ChipDataset([chip] * 40, [0] * 40, 88, 0.6875, 0.0, 1.0, train=True)
    rows_seen = set()
    for i in range(40):
        rng = np.random.default_rng([0, 0, i])
        factor = 1.0 + s * (2.0 * float(rng.random()) - 1.0)
        rows = min(128, round(88 / factor))
        top, left = int(rng.integers(0, 129 - rows)), int(rng.integers(0, 41))
        flip = bool(rng.random() < 0.5)
        win = torch.from_numpy(chip[top : top + rows, left : left + 88].copy()).float() / 255
        want = F.interpolate(win[None, None], size=(88, 88), mode="bilinear", antialias=True)[0]
        want = want.flip(-1) if flip else want
        got, _ = stretched[i]
        assert got.shape == (1, 88, 88)
        assert torch.allclose(got, want, atol=1e-6)
        rows_seen.add(rows)
        # no stretch: the window is the 88 x 88 crop itself (no resize), as before the option
        rng = np.random.default_rng([0, 0, i])
        top, left = int(rng.integers(0, 41)), int(rng.integers(0, 41))
        crop = torch.from_numpy(chip[top : top + 88, left : left + 88].copy()).float() / 255
        crop = crop.flip(-1) if rng.random() < 0.5 else crop
        assert torch.equal(plain[i][0][0], crop)
    assert min(rows_seen) < 80 and max(rows_seen) > 96  # factors near both ends were drawn
    held = ChipDataset([chip], [0], 88, 0.6875, 0.0, 1.0, train=False, stretch=s)
    assert torch.equal(held[0][0][0], torch.from_numpy(chip[20:108, 20:108].copy()).float() / 255)
    with pytest.raises(ValueError, match="range stretch"):
        ChipDataset([chip], [0], 88, 0.6875, 0.0, 1.0, train=True, stretch=1.0)


def test_gain_jitter_scales_pixels_only_on_a_real_chip():
    """`--gain-jitter`: a training view is the plain view (same crop, same flip) times one
    factor drawn from [1-g, 1+g] after the other draws; evaluation views are untouched."""
    import numpy as np
    import torch

    from sarkit.tasks.images import ChipDataset

    chip = real_chip("train", "0")
    g = 0.3
    mean, std = 0.1, 0.09
    jittered = ChipDataset([chip] * 40, [0] * 40, 88, 0.6875, mean, std, train=True, gain=g)
    plain = ChipDataset([chip] * 40, [0] * 40, 88, 0.6875, mean, std, train=True)
    factors = []
    for i in range(40):
        rng = np.random.default_rng([0, 0, i])
        rng.integers(0, 41), rng.integers(0, 41), rng.random()  # top, left, flip
        factor = 1.0 + g * (2.0 * float(rng.random()) - 1.0)
        got = jittered[i][0] * std + mean  # back to [0, 1] pixels
        want = plain[i][0] * std + mean
        assert torch.allclose(got, want * factor, atol=1e-5)
        factors.append(factor)
    assert min(factors) < 0.8 and max(factors) > 1.2  # factors near both ends were drawn
    held = ChipDataset([chip], [0], 88, 0.6875, mean, std, train=False, gain=g)
    crop = torch.from_numpy(chip[20:108, 20:108].copy()).float() / 255
    assert torch.allclose(held[0][0][0] * std + mean, crop, atol=1e-6)
    with pytest.raises(ValueError, match="gain jitter"):
        ChipDataset([chip], [0], 88, 0.6875, mean, std, train=True, gain=1.0)


def test_chip_norm_divides_each_chip_by_its_median_on_real_chips():
    """`--chip-norm`: every view (training and evaluation) is the chip over its own median,
    so a darker collection of the same target gives the same view; an all-dark chip stays
    finite."""
    import numpy as np
    import torch

    from sarkit.tasks.images import ChipDataset

    for chip in (real_chip("train", "0"), real_chip("val", "0")):
        held = ChipDataset([chip], [0], 88, 0.6875, 1.0, 1.0, train=False, chip_norm=True)
        crop = torch.from_numpy(chip[20:108, 20:108].copy()).float()
        want = crop / float(np.median(chip)) - 1.0
        assert torch.allclose(held[0][0][0], want, atol=1e-5)
        # the same chip at 80 % of its brightness: the same view, up to the rounding of the
        # uint8 pixels and their median (a few per cent); without the norm 20 % apart
        darker = np.round(chip * 0.8).astype(np.uint8)
        dark = ChipDataset([darker], [0], 88, 0.6875, 1.0, 1.0, train=False, chip_norm=True)
        assert (dark[0][0] - held[0][0]).abs().mean() < 0.06
        unnormed = torch.from_numpy(darker[20:108, 20:108].copy()).float() / float(np.median(chip))
        assert (unnormed - 1.0 - held[0][0][0]).abs().mean() > 0.15
        plain = ChipDataset([chip], [0], 88, 0.6875, 0.0, 1.0, train=False)
        assert not torch.allclose(plain[0][0], held[0][0] + 1.0, atol=1e-3)  # it did divide
        train = ChipDataset([chip] * 4, [0] * 4, 88, 0.6875, 1.0, 1.0, train=True, chip_norm=True)
        plain = ChipDataset([chip] * 4, [0] * 4, 88, 0.6875, 0.0, 1.0, train=True)
        for i in range(4):  # the same crop and flip, divided by the median
            want = plain[i][0] * 255.0 / float(np.median(chip)) - 1.0
            assert torch.allclose(train[i][0], want, atol=1e-5)
    black = np.zeros((128, 128), np.uint8)
    view = ChipDataset([black], [0], 88, 0.6875, 1.0, 1.0, train=False, chip_norm=True)[0][0]
    assert torch.isfinite(view).all()


def test_chip_norm_is_recorded_and_eval_applies_it(cli, tmp_path, monkeypatch):
    import sarkit.tasks.images as images

    made = []

    class Recording(images.ChipDataset):
        def __init__(self, *args, **kwargs):
            made.append((kwargs.get("train"), kwargs.get("chip_norm", False)))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(images, "ChipDataset", Recording)
    data = mstar_folders(tmp_path / "data", train=6, val=4)
    run = tmp_path / "run"
    proc = cli("finetune", "classify", "--data", data, *TINY, "--epochs", "2", "--chip-norm",
               "--center-crop", "0.6875", "-o", run)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["head"]["chip_norm"] is True
    assert (config["vision"]["mean"], config["vision"]["std"]) == (1.0, 1.0)
    assert made == [(True, True), (False, True)]  # training and held-out views
    proc = cli("eval", "classify", run, "--data", data, "--weights", "last")
    assert proc.returncode == 0, proc.stderr
    assert made[2:] == [(False, True)]  # eval divides by the median too
    metrics = json.loads(proc.stdout)["metrics"]
    last = eval_rows(run)[-1]
    for key in ("top1", "mean_class_acc"):
        assert metrics[key] == pytest.approx(float(last[key]), abs=1e-5)


def test_range_stretch_option_trains_and_is_recorded(cli, tmp_path):
    data = mstar_folders(tmp_path / "data", train=3, val=2)
    run = tmp_path / "run"
    proc = cli("finetune", "classify", "--data", data, *TINY, "--epochs", "1",
               "--range-stretch", "0.15", "--gain-jitter", "0.3", "--center-crop", "0.6875",
               "-o", run)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["extra"]["range_stretch"] == 0.15
    assert config["options"]["extra"]["gain_jitter"] == 0.3
    proc = cli("finetune", "classify", "--data", data, *TINY, "--range-stretch", "1", "-o",
               tmp_path / "bad")  # fmt: skip
    assert proc.returncode == 2 and "range-stretch" in proc.stderr
    proc = cli("finetune", "classify", "--data", data, *TINY, "--gain-jitter", "-0.1", "-o",
               tmp_path / "bad")  # fmt: skip
    assert proc.returncode == 2 and "gain-jitter" in proc.stderr
