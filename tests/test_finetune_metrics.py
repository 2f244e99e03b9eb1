"""The task metrics against hand-computed cases, and layer-wise lr decay groups."""

from __future__ import annotations

import numpy as np
import pytest


def test_classification_metrics_by_hand():
    from sarkit.tasks.metrics import classification

    labels = np.array([0, 0, 1, 1, 2, 3])
    scores = np.array(
        [
            [0.7, 0.1, 0.1, 0.1],  # 0 -> 0 right
            [0.15, 0.5, 0.3, 0.05],  # 0 -> 1 wrong, 0 is 3rd: top-3 hit
            [0.2, 0.6, 0.1, 0.1],  # 1 -> 1 right
            [0.5, 0.2, 0.25, 0.05],  # 1 -> 0 wrong, 1 is 3rd: top-3 hit
            [0.1, 0.1, 0.7, 0.1],  # 2 right
            [0.4, 0.3, 0.2, 0.1],  # 3 -> 0 wrong, 3 is 4th: top-3 miss
        ]
    )
    found = classification(labels, scores, ["a", "b", "c", "d"])
    assert found["metrics"]["top1"] == pytest.approx(3 / 6)
    # per class: a 1/2, b 1/2, c 1, d 0 -> mean 0.5
    assert found["per_class"] == [0.5, 0.5, 1.0, 0.0]
    assert found["metrics"]["mean_class_acc"] == pytest.approx(0.5)
    assert found["metrics"]["top3"] == pytest.approx(5 / 6)  # all but the last row
    assert found["confusion"] == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]


def test_segmentation_metrics_by_hand():
    from sarkit.tasks.metrics import confusion, segmentation

    target = np.array([[0, 0, 1, 1], [1, 1, 255, 2]])
    pred = np.array([[0, 1, 1, 1], [1, 0, 2, 2]])
    cm = confusion(pred, target, 3, 255)
    assert cm.tolist() == [[1, 1, 0], [1, 3, 0], [0, 0, 1]]  # the 255 pixel left out
    found = segmentation(cm, ["sea", "ship", "land"])
    assert found["oa"] == pytest.approx(5 / 7)
    # IoU: sea 1/(2+2-1)=1/3, ship 3/(4+4-3)=3/5, land 1/1
    assert found["iou_sea"] == pytest.approx(1 / 3)
    assert found["iou_ship"] == pytest.approx(3 / 5)
    assert found["iou_land"] == pytest.approx(1.0)
    assert found["miou"] == pytest.approx((1 / 3 + 3 / 5 + 1) / 3)
    # a class absent from truth and prediction is left out of the mean
    absent = segmentation(np.array([[2, 0, 0], [0, 2, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert absent["miou"] == 1.0 and "iou_c" not in absent


def test_layer_decay_groups():
    import timm
    from torch import nn

    from sarkit.tasks.finetune import layer_decay_groups

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model(
                "vit_tiny_patch16_224", num_classes=0, img_size=32, depth=2
            )
            self.head = nn.Linear(192, 3)

    model = M()
    groups = layer_decay_groups(model, 0.05, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    b = model.backbone
    assert scale[id(model.head.weight)] == 1.0 and scale[id(b.norm.weight)] == 1.0
    assert scale[id(b.blocks[1].attn.qkv.weight)] == 0.5
    assert scale[id(b.blocks[0].attn.qkv.weight)] == 0.25
    assert scale[id(b.patch_embed.proj.weight)] == 0.125 and scale[id(b.pos_embed)] == 0.125
    assert decay[id(b.pos_embed)] == 0.0 and decay[id(b.blocks[0].attn.qkv.weight)] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
