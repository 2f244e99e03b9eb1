"""The detection head: a plain-ViT detector after ViTDet, under torchvision's detection heads.

ViTDet (Li et al., 2022) keeps the ViT plain and builds a simple feature pyramid from its
last (stride-16) feature map alone: strides 4 and 8 by transposed convolutions, 16 as it is,
32 by max pooling, each then a 1x1 and a 3x3 convolution with LayerNorm, plus a stride-64
level pooled from stride 32 (detectron2's LastLevelMaxPool). torchvision's Faster R-CNN,
RetinaNet or FCOS (``--head``) run on that pyramid. Anchors scale with the strides (4 x the
stride for Faster R-CNN and RetinaNet, as torchvision's COCO models, or ``--anchor-scale``;
the stride for FCOS, whose size ranges per level follow from it).
torchvision's own resize and ImageNet normalisation are switched off: the images come square
at ``--image-size`` and normalised with the SAR statistics of the init or the data.

Metrics through pycocotools (mAP@50, COCO mAP), a PR curve, and images with boxes drawn in
the colours of the paper's Fig. 12: blue a correct detection, red a false alarm, yellow a
missed target.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sarkit import log
from sarkit.errors import SarkitError
from sarkit.hookspecs import HeadOption
from sarkit.ranges import FRACTION, POSITIVE
from sarkit.tasks import EvalResult, Prepared, Split

HEADS = ("faster_rcnn", "retinanet", "fcos")
LEVELS = ("p2", "p3", "p4", "p5")  # strides 4, 8, 16, 32 for a patch-16 ViT (+ "pool", 64)
TP, FALSE_ALARM, MISSED = (0, 90, 255), (255, 30, 30), (255, 220, 0)  # the paper's Fig. 12


def _channels(text: object) -> int:
    """--fpn-channels: checked at parse time (exit 2)."""
    import typer

    try:
        value = int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise typer.BadParameter(f"'{text}' is not a whole number") from None
    if value < 32 or value % 32:
        raise typer.BadParameter(f"{value}: a multiple of 32 (FCOS's GroupNorm), at least 32")
    return value


_channels.__name__ = "INTEGER"


def _tile(text: object) -> int:
    """--tile: 0 or a window side of at least 16 px, checked at parse time (exit 2)."""
    import typer

    try:
        value = int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise typer.BadParameter(f"'{text}' is not a whole number") from None
    if value != 0 and value < 16:
        raise typer.BadParameter(f"{value}: 0 (whole images) or a window of at least 16 px")
    return value


_tile.__name__ = "INTEGER"


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from the ViT's last map: {p2, p3, p4, p5, pool} with `channels` each."""

    def __init__(self, vit: nn.Module, channels: int = 256):
        from timm.layers import LayerNorm2d

        super().__init__()
        self.vit = vit
        c = vit.num_features
        self.out_channels = channels
        self.patch = int(vit.patch_embed.patch_size[0])
        stages = {
            "p2": nn.Sequential(nn.ConvTranspose2d(c, c // 2, 2, 2), LayerNorm2d(c // 2), nn.GELU(),
                                nn.ConvTranspose2d(c // 2, c // 4, 2, 2)),
            "p3": nn.ConvTranspose2d(c, c // 2, 2, 2),
            "p4": nn.Identity(),
            "p5": nn.MaxPool2d(2, 2),
        }  # fmt: skip
        dims = {"p2": c // 4, "p3": c // 2, "p4": c, "p5": c}
        self.scales = nn.ModuleDict(stages)
        self.outputs = nn.ModuleDict(
            {name: nn.Sequential(
                nn.Conv2d(dims[name], channels, 1, bias=False), LayerNorm2d(channels),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False), LayerNorm2d(channels))
             for name in LEVELS}
        )  # fmt: skip

    def strides(self) -> list[int]:
        """Strides of the levels in order (p2 .. p5, pool)."""
        s = self.patch
        return [s // 4, s // 2, s, 2 * s, 4 * s]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        tokens = self.vit.forward_features(images)[:, self.vit.num_prefix_tokens :]
        gh, gw = self.vit.patch_embed.grid_size
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)
        out = OrderedDict((n, self.outputs[n](self.scales[n](x))) for n in LEVELS)
        out["pool"] = nn.functional.max_pool2d(out["p5"], 1, 2, 0)
        return out


def _fixed_transform(size: int):
    """torchvision's batching without its resize (the input is already square at `size`)
    or its ImageNet normalisation (the dataset applies the SAR mean and std)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class Fixed(GeneralizedRCNNTransform):
        def resize(self, image, target=None):
            return image, target

    return Fixed(size, size, [0.0], [1.0], size_divisible=1)


def build_detector(
    vit: nn.Module, head: str, classes: int, size: int, channels: int, anchor_scale: float = 4.0
) -> nn.Module:
    """torchvision's `head` on ViTDet's pyramid; `classes` object classes (+ background);
    anchors of `anchor_scale` x each level's stride (Faster R-CNN, RetinaNet)."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    pyramid = SimpleFeaturePyramid(vit, channels)
    strides = pyramid.strides()
    side = size // strides[-1]
    if head == "fcos" and channels // 32 * side * side < 2:  # GroupNorm(32) needs 2 values
        raise SarkitError(
            f"--head fcos: the stride-{strides[-1]} level is {side}x{side} at --image-size "
            f"{size}; give --fpn-channels 64 or more, or --image-size {2 * strides[-1]} or more"
        )
    common = dict(num_classes=classes + 1, min_size=size, max_size=size)
    if head == "faster_rcnn":
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        sizes = tuple((anchor_scale * s,) for s in strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
        pool = MultiScaleRoIAlign(list(LEVELS), output_size=7, sampling_ratio=2)
        width = 4 * channels  # torchvision's 1024 at ViTDet's 256 channels
        model = FasterRCNN(
            pyramid,
            rpn_anchor_generator=anchors,
            box_roi_pool=pool,
            box_head=TwoMLPHead(channels * 49, width),
            box_predictor=FastRCNNPredictor(width, classes + 1),
            box_score_thresh=0.05,
            min_size=size,
            max_size=size,
        )
    elif head == "retinanet":
        scales = tuple(tuple(anchor_scale * s * 2 ** (i / 3) for i in range(3)) for s in strides)
        anchors = AnchorGenerator(scales, ((0.5, 1.0, 2.0),) * 5)
        model = RetinaNet(pyramid, anchor_generator=anchors, score_thresh=0.05,
                          detections_per_img=100, **common)  # fmt: skip
    elif head == "fcos":
        anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * 5)
        model = FCOS(pyramid, anchor_generator=anchors, score_thresh=0.05, **common)
    else:
        raise SarkitError(f"--head {head}: one of {', '.join(HEADS)}")
    model.transform = _fixed_transform(size)
    return model


class Detector(nn.Module):
    """The torchvision detector behind the loop's calling convention: training forward gives
    ``{"loss": sum of the head's losses, each loss}``; eval forward the detections."""

    def __init__(self, vit: nn.Module, head: str, classes: int, size: int, channels: int,
                 anchor_scale: float = 4.0):  # fmt: skip
        super().__init__()
        self.net = build_detector(vit, head, classes, size, channels, anchor_scale)

    def forward(
        self,
        images: torch.Tensor,
        boxes: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> Any:
        if not self.training:
            return self.net(list(images))
        targets = [{"boxes": b[:n].float(), "labels": lb[:n]}
                   for b, lb, n in zip(boxes, labels, counts.tolist(), strict=True)]  # fmt: skip
        losses = self.net(list(images), targets)
        total = sum(losses.values())
        return {"loss": total, **{k: v.detach() for k, v in losses.items()}}


@torch.no_grad()
def predict(model: Detector, dataset: Any, batch_size: int = 8, dtype=torch.float32) -> list[dict]:
    """Detections per item, in the item's own pixels (boxes, labels, scores as numpy)."""
    from sarkit.tasks.detdata import SceneSet, collate

    device = next(model.parameters()).device
    model.eval()
    if isinstance(dataset, SceneSet):
        return [predict_scene(model, c, dataset, batch_size, dtype) for c in dataset.cached]
    out = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    autocast = dtype != torch.float32
    for batch in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            found = model(batch["images"].to(device, dtype=torch.float32))
        for d in found:
            c = dataset.cached[len(out)]
            boxes = d["boxes"].float().cpu().numpy().copy()
            boxes[:, 0::2] *= c.width / dataset.size
            boxes[:, 1::2] *= c.height / dataset.size
            out.append({"boxes": boxes, "labels": d["labels"].cpu().numpy(),
                        "scores": d["scores"].float().cpu().numpy()})  # fmt: skip
    return out


EDGE = 2.0  # px: a box this near a window's inner edge is cut by it (a neighbour holds it whole)


@torch.no_grad()
def predict_scene(model: Detector, c: Any, scenes: Any, batch_size: int, dtype) -> dict:
    """Detections of one whole scene from overlapping windows: boxes touching a window edge
    inside the scene are dropped (the overlap holds them whole in a neighbour), the rest
    merged by per-class NMS at IoU 0.5, the 100 best kept, in the file's pixels."""
    from torchvision.ops import batched_nms

    from sarkit.tasks.detdata import window
    from sarkit.tasks.segdata import windows

    device = next(model.parameters()).device
    h, w = c.image.shape
    s, stride = scenes.size, scenes.size - scenes.overlap
    spots = [(t, left) for t in windows(h, s, stride) for left in windows(w, s, stride)]
    boxes, labels, scores = [], [], []
    autocast = dtype != torch.float32
    for i in range(0, len(spots), batch_size):
        part = spots[i : i + batch_size]
        x = torch.stack([((window(c, t, left, s) - scenes.mean) / scenes.std)[None]
                         for t, left in part])  # fmt: skip
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            found = model(x.to(device))
        for (t, left), d in zip(part, found, strict=True):
            b = d["boxes"].float().cpu()
            inner = torch.zeros(len(b), dtype=torch.bool)
            if left > 0:
                inner |= b[:, 0] < EDGE
            if t > 0:
                inner |= b[:, 1] < EDGE
            if left + s < w:
                inner |= b[:, 2] > s - EDGE
            if t + s < h:
                inner |= b[:, 3] > s - EDGE
            keep = ~inner
            boxes.append(b[keep] + torch.tensor([left, t, left, t], dtype=torch.float32))
            labels.append(d["labels"].cpu()[keep])
            scores.append(d["scores"].float().cpu()[keep])
    b, lb, sc = torch.cat(boxes), torch.cat(labels), torch.cat(scores)
    b[:, 0::2] = b[:, 0::2].clamp(0, w)
    b[:, 1::2] = b[:, 1::2].clamp(0, h)
    kept = batched_nms(b, sc, lb, 0.5)[:100]
    b = b[kept].numpy().copy()
    b[:, 0::2] *= c.width / w
    b[:, 1::2] *= c.height / h
    return {"boxes": b, "labels": lb[kept].numpy(), "scores": sc[kept].numpy()}


def truths_of(cached: list) -> list[dict]:
    return [{"boxes": c.item.boxes, "labels": c.item.labels, "crowd": c.item.crowd,
             "width": c.width, "height": c.height} for c in cached]  # fmt: skip


def measure(model: Detector, dataset: Any, classes: list[str], batch_size: int = 8,
            dtype=torch.float32) -> tuple[dict, list[dict]]:  # fmt: skip
    from sarkit.tasks.metrics import detection

    found = predict(model, dataset, batch_size, dtype)
    return detection(truths_of(dataset.cached), found, classes), found


def match(truth: dict, found: dict, threshold: float, iou: float = 0.5):
    """Greedy matching at IoU `iou` of the detections scoring at least `threshold`, best
    first, to same-class boxes: (true positives, false alarms, missed) as box lists.
    Crowd / difficult boxes are neither missed nor make a false alarm."""
    from torchvision.ops import box_iou

    keep = found["scores"] >= threshold
    boxes, labels = found["boxes"][keep], found["labels"][keep]
    order = np.argsort(-found["scores"][keep], kind="stable")
    gt, gl, crowd = truth["boxes"], truth["labels"], truth["crowd"]
    ious = (box_iou(torch.as_tensor(boxes).reshape(-1, 4), torch.as_tensor(gt).reshape(-1, 4))
            .numpy() if len(boxes) and len(gt) else np.zeros((len(boxes), len(gt))))  # fmt: skip
    used = np.zeros(len(gt), bool)
    tp, fa = [], []
    for i in order:
        near = (gl == labels[i]) & (ious[i] >= iou)
        cand = np.where(near & ~used & ~crowd)[0]
        if len(cand):
            j = cand[np.argmax(ious[i][cand])]
            used[j] = True
            tp.append(boxes[i])
        elif not (near & crowd).any():  # on an ignored box it is neither
            fa.append(boxes[i])
    missed = [gt[j] for j in range(len(gt)) if not used[j] and not crowd[j]]
    return tp, fa, missed


def boxes_png(image: np.ndarray, tp, fa, missed, path: Path, scale: float = 1.0) -> Path:
    """The grey image with boxes: blue correct, red false alarm, yellow missed (Fig. 12)."""
    from PIL import Image, ImageDraw

    from sarkit.atomic import atomic_path

    im = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(im)
    width = max(1, round(max(im.size) / 400))
    for boxes, colour in ((missed, MISSED), (fa, FALSE_ALARM), (tp, TP)):
        for x0, y0, x1, y1 in boxes:
            draw.rectangle([float(x0), float(y0), float(x1), float(y1)], outline=colour,
                           width=width)  # fmt: skip
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return path


def pr_png(found: dict, classes: list[str], path: Path, title: str) -> Path:
    """Precision-recall at IoU 0.5 per class (COCO's 101 recall points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sarkit.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, p in found["curves"].items():
        ax.plot(found["recall"], p, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if found["curves"]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def _untrained_vit(spec: Any) -> nn.Module:
    """The run's ViT to load weights into, without timm's random init (seconds on a
    loaded CPU, then overwritten); models without the switch are built as usual."""
    from sarkit.tasks.backbone import BackboneSpec, build_backbone

    quick = BackboneSpec.from_dict(spec.to_dict())
    quick.model_args = {**spec.model_args, "weight_init": "skip"}
    try:
        return build_backbone(quick, None)
    except TypeError:  # not a timm VisionTransformer
        return build_backbone(spec, None)


def training_set(cached: list, size: int, spec: Any, tile: int, seed: int) -> Any:
    """Whole resized images, or with ``tile`` windows cut from the scenes."""
    from sarkit.tasks import detdata

    if tile:
        return detdata.WindowDataset(cached, size, spec.mean, spec.std, seed)
    return detdata.BoxDataset(cached, size, spec.mean, spec.std, True, seed)


def held_set(cached: list, size: int, spec: Any, tile: int) -> Any:
    """Whole resized images, or with ``tile`` whole scenes measured through windows."""
    from sarkit.tasks import detdata

    if tile:
        return detdata.SceneSet(cached, size, spec.mean, spec.std)
    return detdata.BoxDataset(cached, size, spec.mean, spec.std, False)


class DetectHead:
    """`sarkit finetune detect` / `sarkit eval detect`."""

    name = "detect"
    summary = (
        "Object detection (ViTDet simple feature pyramid + torchvision Faster R-CNN, RetinaNet "
        "or FCOS): COCO JSON or a VOC folder; mAP@50, COCO mAP, PR curve, drawn boxes."
    )
    primary = "map50"
    # the paper's Table 3: AdamW 1e-4, 36 epochs, warm-up, multi-step (x 0.1 at 75 % and 90 %)
    defaults = {
        "lr": 1e-4,
        "schedule": "multistep",
        "lr_decay": 0.1,
        "warmup_steps": 50,
        "epochs": 36,
        "batch_size": 8,
        "image_size": 256,
        "weight_decay": 0.1,
        "drop_path": 0.1,
    }
    options = (
        HeadOption("--head", "torchvision detection head.", "faster_rcnn", choices=HEADS),
        HeadOption(
            "--fpn-channels", "Channels of the feature pyramid (a multiple of 32).", 256, _channels
        ),  # fmt: skip
        HeadOption(
            "--anchor-scale",
            "Anchor side as a multiple of each level's stride, Faster R-CNN and RetinaNet "
            "(4 as torchvision's COCO models; 2 for ships of a few pixels).",
            4.0,
            POSITIVE,
        ),
        HeadOption(
            "--tile",
            "Scene pixels per window: train on windows of TILE x TILE (resized to "
            "--image-size; half placed around a box), measure whole scenes through "
            "overlapping windows. For targets of a few pixels in large scenes (HRSID: "
            "ships of about 30 px in 800 px). 0: each image resized whole.",
            0,
            _tile,
            modes=("finetune",),
        ),
        HeadOption(
            "--layer-decay",
            "Layer-wise lr decay of the ViT (default 0.7 from a pretrained init, as ViTDet's "
            "ViT-B; 1.0 from random).",
            None,
            FRACTION,
        ),
        HeadOption(
            "--score-threshold",
            "Detections drawn and counted as found at least this score.",
            0.5,
            FRACTION,
            modes=("eval",),
        ),
        HeadOption("--drawn", "Images with boxes drawn by eval.", 4, int, modes=("eval",)),
    )

    # ------------------------------------------------------------------ training

    def prepare(self, options: Any) -> Prepared:
        from sarkit.tasks import detdata
        from sarkit.tasks.backbone import build_backbone, resolve_init
        from sarkit.tasks.finetune import HeadTask, layer_decay_groups
        from sarkit.tasks.splits import seeded_split

        extra = options.extra
        spec, weights = resolve_init(
            options.init, options.vision, options.image_size, options.vision_args
        )
        data = detdata.load(options.data)
        detdata.report(str(options.data), data.skipped)
        if not data.items:
            raise SarkitError(f"--data {options.data}: no usable image"
                              + (f" ({data.skipped[0]})" if data.skipped else ""))  # fmt: skip
        size = spec.image_size
        tile = int(extra.get("tile") or 0)
        cached, bad = detdata.read_images(data.items, size, str(options.data), tile)
        detdata.report(str(options.data), bad)
        by_name = {c.item.name: c for c in cached}
        if options.val_data:
            held = detdata.load(options.val_data, data.categories)
            detdata.report(str(options.val_data), held.skipped)
            va_cached, bad = detdata.read_images(held.items, size, str(options.val_data), tile)
            detdata.report(str(options.val_data), bad)
            tr_cached, how = cached, "given (--val-data)"
        elif data.split is not None:
            tr_names, va_names, how = data.split
            tr_cached = [by_name[n] for n in tr_names if n in by_name]
            va_cached = [by_name[n] for n in va_names if n in by_name]
        else:
            by_path = {str(c.item.path): c for c in cached}  # stems may repeat across folders
            tagged = [(p, 0) for p in by_path]
            tr, va = seeded_split(tagged, options.val_fraction, options.seed)
            tr_cached, va_cached = [by_path[p] for p, _ in tr], [by_path[p] for p, _ in va]
            how = f"seeded {round((1 - options.val_fraction) / options.val_fraction)}:1"
        if not tr_cached or not va_cached:
            raise SarkitError(
                f"--data {options.data}: {len(tr_cached)} usable training and {len(va_cached)} "
                "held-out images (both are needed)"
            )
        if not any((~c.item.crowd).any() for c in va_cached):
            raise SarkitError(
                f"--data {options.data}: the {len(va_cached)} held-out images hold no box "
                "(mAP would be undefined)"
            )
        if not spec.stats_from_init:
            from sarkit.tasks.images import stats

            spec.mean, spec.std = stats([c.image.numpy() for c in tr_cached])
        head = extra.get("head") or "faster_rcnn"
        channels = int(extra.get("fpn_channels") or 256)
        torch.manual_seed(options.seed)
        vit = build_backbone(spec, weights, options.drop_path)
        anchor_scale = float(extra.get("anchor_scale") or 4.0)
        model = Detector(vit, head, len(data.categories), size, channels, anchor_scale)
        decay = extra.get("layer_decay")
        if decay is None:
            decay = 1.0 if spec.provenance["kind"] == "random" else 0.7
        dataset = training_set(tr_cached, size, spec, tile, options.seed)
        measured = held_set(va_cached, size, spec, tile)
        classes = data.categories

        def held_out(module: nn.Module) -> dict[str, float]:
            return measure(module, measured, classes, max(options.batch_size, 8))[0]["metrics"]

        task = HeadTask(
            model,
            self.name,
            self.primary,
            held_out,
            options.output,
            groups=lambda wd: layer_decay_groups(model, wd, decay, "net.backbone.vit."),
        )
        n_boxes = sum(len(c.item.boxes) for c in tr_cached)
        log.info(
            f"detect: {len(tr_cached)} train ({n_boxes} boxes) / {len(va_cached)} held-out "
            f"images ({how}), classes {classes}, {head} on {spec.timm_name} @ {size}px"
            + (f" ({tile}px windows)" if tile else "")
            + ", "
            f"init {spec.provenance['kind']}"
        )
        config = {
            "init": spec.provenance,
            "vision": spec.to_dict(),
            "head": {"kind": head, "classes": classes, "fpn_channels": channels,
                     "anchor_scale": anchor_scale, "layer_decay": decay, "data_kind": data.kind,
                     "tile": tile, "data": str(Path(options.data).resolve())},
        }  # fmt: skip
        split = Split([str(c.item.path) for c in tr_cached], [str(c.item.path) for c in va_cached],
                      how, options.seed)  # fmt: skip
        return Prepared(task, dataset, detdata.collate, split, config)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, run: Path, options: Any) -> EvalResult:
        from sarkit.model.weights import load_weights
        from sarkit.tasks import detdata, runfolder
        from sarkit.tasks.backbone import BackboneSpec

        config = runfolder.read_config(run)
        head = config["head"]
        spec = BackboneSpec.from_dict(config["vision"])
        classes = list(head["classes"])
        val_data = config["options"].get("val_data")
        source = options.data or val_data or head["data"]
        data = detdata.load(source, classes)
        detdata.report(str(source), data.skipped)
        by_path = {str(it.path): it for it in data.items}
        if Path(source).resolve() == Path(head["data"]) and not val_data:
            split = runfolder.read_json(Path(run) / "split.json", "the run's split")
            items = [by_path[p] for p in split.get("val", []) if p in by_path]
            how = f"the run's held-out split ({split.get('how')})"
        elif data.split is not None:
            held = set(data.split[1])
            items = [it for it in data.items if it.name in held]
            how = data.split[2]
        else:
            items, how = data.items, "every image"
        tile = int(head.get("tile", 0))
        cached, bad = detdata.read_images(items, spec.image_size, str(source), tile)
        detdata.report(str(source), bad)
        if not cached:
            raise SarkitError(f"--data {source}: no usable image to measure")
        log.info(f"eval detect: {len(cached)} images of {source} ({how})")
        shape = (int(head["fpn_channels"]), float(head.get("anchor_scale", 4.0)))
        model = Detector(_untrained_vit(spec), head["kind"], len(classes), spec.image_size, *shape)
        load_weights(model, runfolder.weights_path(run, options.weights))
        dataset = held_set(cached, spec.image_size, spec, tile)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            options.precision, torch.float32
        )
        found, detections = measure(model, dataset, classes, options.batch_size, dtype)
        given = options.extra.get("score_threshold")
        threshold = 0.5 if given is None else float(given)  # 0 is a threshold, not "unset"
        truths = truths_of(cached)
        counts = np.zeros(3, int)
        matched = []
        for t, d in zip(truths, detections, strict=True):
            m = match(t, d, threshold)
            counts += [len(x) for x in m]
            matched.append(m)
        tp, fa, missed = (int(v) for v in counts)
        log.info(f"at score >= {threshold:g}: {tp} found, {fa} false alarms, {missed} missed")
        table = [(f"at score >= {threshold:g}", f"{tp} found, {fa} false alarms, {missed} missed"),
                 ("images", str(len(cached)))]  # fmt: skip
        k = max(0, int(options.extra.get("drawn") if options.extra.get("drawn") is not None else 4))
        drawn = [(c.item.path, m) for c, m in zip(cached[:k], matched[:k], strict=True)]
        details = {**found, "classes": classes, "n": len(cached), "drawn": drawn,
                   "counts": {"found": tp, "false_alarms": fa, "missed": missed,
                              "score_threshold": threshold}}  # fmt: skip
        return EvalResult(found["metrics"], details, table)

    def figures(self, result: EvalResult, folder: Path) -> list[Path]:
        import json

        from sarkit.atomic import write_text
        from sarkit.raster.tileread import read_u8

        d = result.details
        m = result.metrics
        title = f"AP@50 {100 * m['map50']:.2f}, mAP {100 * m['map']:.2f} on {d['n']} images"
        out = [pr_png(d, d["classes"], folder / "pr_curve.png", title)]
        for path, (tp, fa, missed) in d["drawn"]:
            out.append(boxes_png(read_u8(path), tp, fa, missed, folder / f"boxes_{path.stem}.png"))
        write_text(folder / "detect_counts.json", json.dumps(d["counts"], indent=2) + "\n")
        return out
