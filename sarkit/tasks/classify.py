"""The classification head: ViT + linear layer (ViT-CLS, the paper's Table 4 first column).

Class token or mean-pooled tokens (``--pool``), label smoothing, layer-wise lr decay (BEiT/
MAE fine-tuning: 1.0 for random init, where there is nothing to keep), translation + flip
augmentation (a range stretch, ``--range-stretch``; a gain jitter, ``--gain-jitter``; each
chip divided by its median, ``--chip-norm``); top-1, top-3, mean per-class accuracy, a
confusion-matrix PNG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sarkit import log
from sarkit.errors import SarkitError
from sarkit.hookspecs import HeadOption
from sarkit.ranges import FRACTION, number_in
from sarkit.tasks import EvalResult, Prepared, Split

UNIT = number_in(0, 1, lo_open=True)
BELOW_ONE = number_in(0, 1, hi_open=True)


class Classifier(nn.Module):
    """A headless timm ViT and a linear layer; forward gives the loss the loop trains on."""

    def __init__(self, backbone: nn.Module, num_classes: int, pool: str, smoothing: float):
        super().__init__()
        backbone.reset_classifier(0, "token" if pool == "cls" else "avg")
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # as MAE: start from ~0 logits
        nn.init.zeros_(self.head.bias)
        self.smoothing = smoothing

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.logits(images).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.smoothing)
        acc = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "acc": acc.detach()}


@torch.no_grad()
def predict(model: Classifier, dataset: Any, batch_size: int, dtype=torch.float32) -> np.ndarray:
    """Softmax scores of every item, in order."""
    from sarkit.tasks.images import collate

    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    out = []
    autocast = dtype != torch.float32
    for batch in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            logits = model.logits(batch["images"].to(device))
        out.append(logits.float().softmax(1).cpu().numpy())
    return np.concatenate(out)


def held_out_views(images: list, labels: list, spec: Any, chip_norm: bool) -> Any:
    """The evaluation views of a run's backbone: one place, so that fine-tuning's
    per-epoch measure and `eval classify` see the same pixels."""
    from sarkit.tasks.images import ChipDataset

    return ChipDataset(
        images,
        labels,
        spec.image_size,
        spec.center_crop,
        spec.mean,
        spec.std,
        train=False,
        chip_norm=chip_norm,
    )


def confusion_png(cm: list[list[int]], classes: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sarkit.atomic import atomic_path

    m = np.asarray(cm, dtype=float)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(classes), 0.8 + 0.5 * len(classes)))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if m[i, j]:
                colour = "white" if rows[i, j] > 0.5 else "black"
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


class ClassifyHead:
    """`sarkit finetune classify` / `sarkit eval classify`."""

    name = "classify"
    summary = (
        "Image classification (ViT + linear head): class folders (train/ + val/ or one set, "
        "split 4:1), a CSV path,label or records with 'label'; top-1/top-3, confusion matrix."
    )
    primary = "top1"
    # the paper's Table 3: AdamW 3e-3, warm-up, cosine decay
    defaults = {
        "lr": 3e-3,
        "schedule": "cosine",
        "warmup_steps": 100,
        "epochs": 50,
        "batch_size": 64,
        "image_size": 64,
        "weight_decay": 0.05,
        "drop_path": 0.1,
    }
    options = (
        HeadOption(
            "--pool",
            "ViT features: class token or mean of tokens.",
            "mean",
            choices=("mean", "cls"),
        ),
        HeadOption("--label-smoothing", "Cross-entropy label smoothing.", 0.1, FRACTION),
        HeadOption(
            "--layer-decay",
            "Layer-wise lr decay (default 0.75 from a pretrained init, 1.0 from random).",
            None,
            UNIT,
        ),
        HeadOption(
            "--center-crop",
            "Side fraction of each chip the model sees (MSTAR: "
            "0.6875 = 88/128; default: the init run's, else 1).",
            None,
            UNIT,
            modes=("finetune",),
        ),
        HeadOption(
            "--range-stretch",
            "Stretch each training view along the rows (range) by a random factor in "
            "[1-S, 1+S], target and shadow alike. On MSTAR 17 -> 15 deg, 0.15 cost 13 "
            "points (docs/results.md): it also blurs the targets' sizes. Default 0: off.",
            0.0,
            BELOW_ONE,
            modes=("finetune",),
        ),
        HeadOption(
            "--gain-jitter",
            "Multiply each training view's pixels by a random factor in [1-G, 1+G], so "
            "that a collection's overall brightness is no class cue: MSTAR's 15-deg test "
            "chips are 12-13 % darker than its 17-deg training chips, and 0.3 took a "
            "conv-stem ViT there from 90.2 to 95.8 % (docs/results.md). Default 0: off.",
            0.0,
            BELOW_ONE,
            modes=("finetune",),
        ),
        HeadOption(
            "--chip-norm",
            "Divide each chip by its own median (its clutter level), in training and "
            "evaluation: brightness differences between collections cancel (on MSTAR "
            "90.2 to 96.1 %, docs/results.md). Recorded in the run; eval applies it.",
            False,
            bool,
            modes=("finetune",),
        ),
    )

    # ------------------------------------------------------------------ training

    def prepare(self, options: Any) -> Prepared:
        from sarkit.tasks import labels as labelled
        from sarkit.tasks.backbone import build_backbone, resolve_init
        from sarkit.tasks.finetune import HeadTask, layer_decay_groups
        from sarkit.tasks.images import ChipDataset, collate, read_all, stats
        from sarkit.tasks.splits import seeded_split

        extra = options.extra
        spec, weights = resolve_init(
            options.init, options.vision, options.image_size, options.vision_args
        )
        data = labelled.load(options.data, options.val_data)
        index = {c: i for i, c in enumerate(data.classes)}
        if data.val is None:
            train, val = seeded_split(data.train, options.val_fraction, options.seed)
            how = f"seeded {round((1 - options.val_fraction) / options.val_fraction)}:1"
        else:
            train, val, how = data.train, data.val, "given"
        tr_images, tr_labels, tr_names = read_all(
            [(p, index[c]) for p, c in train], f"{options.data} (train)"
        )
        va_images, va_labels, va_names = read_all(
            [(p, index[c]) for p, c in val], f"{options.val_data or options.data} (held out)"
        )
        chip_norm = bool(extra.get("chip_norm"))
        if chip_norm:  # each chip's median is 1: (x - 1) / 1 centres the clutter at 0
            spec.mean, spec.std = 1.0, 1.0
        elif not spec.stats_from_init:
            spec.mean, spec.std = stats(tr_images)
        if extra.get("center_crop") is not None:
            spec.center_crop = float(extra["center_crop"])
        torch.manual_seed(options.seed)
        backbone = build_backbone(spec, weights, options.drop_path)
        model = Classifier(
            backbone,
            len(data.classes),
            extra.get("pool") or "mean",
            float(extra.get("label_smoothing") or 0.0),
        )
        decay = extra.get("layer_decay")
        if decay is None:
            decay = 1.0 if spec.provenance["kind"] == "random" else 0.75
        extra["layer_decay"] = decay
        common = (spec.image_size, spec.center_crop, spec.mean, spec.std)
        stretch = float(extra.get("range_stretch") or 0.0)
        gain = float(extra.get("gain_jitter") or 0.0)
        dataset = ChipDataset(
            tr_images,
            tr_labels,
            *common,
            train=True,
            seed=options.seed,
            stretch=stretch,
            gain=gain,
            chip_norm=chip_norm,
        )
        held = held_out_views(va_images, va_labels, spec, chip_norm)

        def measure(module: nn.Module) -> dict[str, float]:
            scores = predict(module, held, max(options.batch_size, 64))
            from sarkit.tasks.metrics import classification

            return classification(np.asarray(va_labels), scores, data.classes)["metrics"]

        task = HeadTask(
            model,
            self.name,
            self.primary,
            measure,
            options.output,
            groups=lambda wd: layer_decay_groups(model, wd, decay),
        )
        log.info(
            f"classify: {len(tr_images)} train / {len(va_images)} held-out images ({how}), "
            f"{len(data.classes)} classes, {spec.timm_name} @ {spec.image_size}px, init "
            f"{spec.provenance['kind']}"
        )
        config = {
            "init": spec.provenance,
            "vision": spec.to_dict(),
            "head": {
                "classes": data.classes,
                "pool": extra.get("pool") or "mean",
                "label_smoothing": float(extra.get("label_smoothing") or 0.0),
                "layer_decay": decay,
                "chip_norm": chip_norm,
            },
        }
        split = Split(train=tr_names, val=va_names, how=how, seed=options.seed)
        return Prepared(task, dataset, collate, split, config)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, run: Path, options: Any) -> EvalResult:
        from sarkit.model.weights import load_weights
        from sarkit.tasks import labels as labelled
        from sarkit.tasks import runfolder
        from sarkit.tasks.backbone import BackboneSpec, build_backbone
        from sarkit.tasks.images import read_all
        from sarkit.tasks.metrics import classification

        config = runfolder.read_config(run)
        spec = BackboneSpec.from_dict(config["vision"])
        head = config["head"]
        classes = list(head["classes"])
        if options.data:
            items = labelled.held_out(options.data)
            unknown = sorted({c for _, c in items} - set(classes), key=labelled.natural_key)
            if unknown:
                raise SarkitError(
                    f"--data {options.data}: classes {unknown} are not among the run's "
                    f"{len(classes)} classes ({', '.join(classes)})"
                )
            index = {c: i for i, c in enumerate(classes)}
            pairs = [(p, index[c]) for p, c in items]
        else:
            split = runfolder.read_json(Path(run) / "split.json", "the run's split")
            raise SarkitError(
                f"{run}: give --data (the run held out {len(split.get('val', []))} items of "
                f"{config['options'].get('data')})"
            )
        images, ys, _ = read_all(pairs, str(options.data))
        model = Classifier(build_backbone(spec, None), len(classes), head["pool"], 0.0)
        load_weights(model, runfolder.weights_path(run, options.weights))
        model.eval()
        data = held_out_views(images, ys, spec, bool(head.get("chip_norm", False)))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            options.precision, torch.float32
        )
        scores = predict(model, data, options.batch_size, dtype)
        found = classification(np.asarray(ys), scores, classes)
        table = [(f"acc {c}", f"{a:.4f}") for c, a in zip(classes, found["per_class"], strict=True)]
        details = {"classes": classes, **found, "n": len(ys)}
        return EvalResult(found["metrics"], details, table)

    def figures(self, result: EvalResult, folder: Path) -> list[Path]:
        d = result.details
        title = f"top-1 {100 * result.metrics['top1']:.2f}% on {d['n']} images"
        out = [confusion_png(d["confusion"], d["classes"], folder / "confusion.png", title)]
        per_class = {c: a for c, a in zip(d["classes"], d["per_class"], strict=True)}
        from sarkit.atomic import write_text

        write_text(folder / "per_class.json", json.dumps(per_class, indent=2) + "\n")
        return out
