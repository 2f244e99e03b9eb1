"""Task metrics from standard libraries: scikit-learn for classification, the confusion
matrix for segmentation (OA, per-class IoU, mIoU), pycocotools for detection."""

from __future__ import annotations

import numpy as np


def classification(labels: np.ndarray, scores: np.ndarray, classes: list[str]) -> dict:
    """top-1, top-3 (top-k for fewer classes), per-class accuracy, confusion matrix."""
    from sklearn.metrics import confusion_matrix, top_k_accuracy_score

    n = len(classes)
    pred = scores.argmax(axis=1)
    cm = confusion_matrix(labels, pred, labels=list(range(n)))
    per_class = cm.diagonal() / np.maximum(cm.sum(axis=1), 1)
    k = min(3, n - 1) if n > 2 else 1
    top3 = top_k_accuracy_score(labels, scores, k=k, labels=list(range(n))) if n > 2 else None
    out = {
        "top1": float((pred == labels).mean()),
        "mean_class_acc": float(per_class[cm.sum(axis=1) > 0].mean()),
    }
    if top3 is not None:
        out["top3"] = float(top3)
    return {"metrics": out, "per_class": per_class.tolist(), "confusion": cm.tolist()}


def confusion(pred: np.ndarray, target: np.ndarray, n: int, ignore: int | None) -> np.ndarray:
    """n x n counts (rows truth, columns prediction); `ignore` pixels left out."""
    keep = target != ignore if ignore is not None else np.ones(target.shape, bool)
    t, p = target[keep].astype(np.int64), pred[keep].astype(np.int64)
    return np.bincount(t * n + p, minlength=n * n).reshape(n, n)


def segmentation(cm: np.ndarray, classes: list[str]) -> dict:
    """OA, mIoU and per-class IoU from a confusion matrix (classes without any pixel, truth
    or prediction, are left out of the mean)."""
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    present = union > 0
    out = {
        "oa": float(tp.sum() / max(cm.sum(), 1)),
        "miou": float(np.nanmean(iou[present])) if present.any() else 0.0,
    }
    for name, value in zip(classes, iou, strict=True):
        if not np.isnan(value):
            out[f"iou_{name}"] = float(value)
    return out


def coco_dicts(truths: list[dict], detections: list[dict], classes: list[str]) -> tuple[dict, dict]:
    """COCO ground-truth and detection datasets from per-image dicts.

    `truths[i]`: ``boxes`` (N, 4) x0, y0, x1, y1, ``labels`` 1..K, ``crowd`` bools, ``width``,
    ``height``; `detections[i]`: ``boxes``, ``labels``, ``scores`` in the same frame.
    """
    images = [{"id": i + 1, "width": int(t["width"]), "height": int(t["height"])}
              for i, t in enumerate(truths)]  # fmt: skip
    cats = [{"id": k + 1, "name": name} for k, name in enumerate(classes)]

    def anns(per_image: list[dict], scored: bool) -> list[dict]:
        out = []
        for i, d in enumerate(per_image):
            boxes = np.asarray(d["boxes"], float).reshape(-1, 4)
            crowd = d.get("crowd", np.zeros(len(boxes), bool))
            for k, (x0, y0, x1, y1) in enumerate(boxes):
                w, h = float(x1 - x0), float(y1 - y0)
                a = {"id": len(out) + 1, "image_id": i + 1, "category_id": int(d["labels"][k]),
                     "bbox": [float(x0), float(y0), w, h], "area": w * h,
                     "iscrowd": int(bool(crowd[k])) if not scored else 0}  # fmt: skip
                if scored:
                    a["score"] = float(d["scores"][k])
                out.append(a)
        return out

    gt = {"images": images, "annotations": anns(truths, False), "categories": cats}
    dt = {"images": images, "annotations": anns(detections, True), "categories": cats}
    return gt, dt


def detection(truths: list[dict], detections: list[dict], classes: list[str]) -> dict:
    """COCO box metrics through pycocotools: map (IoU .50:.95), map50, map75, ar100, per-class
    AP@50 (several classes), and the precision-recall curves at IoU .50 for a figure.

    An image list without any ground-truth box has no mAP: an error, not a zero.
    """
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from sarkit.errors import SarkitError

    gt, dt = coco_dicts(truths, detections, classes)
    if not any(not a["iscrowd"] for a in gt["annotations"]):
        raise SarkitError(f"no ground-truth box in the {len(truths)} image(s): mAP is undefined")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset, coco_dt.dataset = gt, dt
        coco_gt.createIndex()
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = [max(float(v), 0.0) for v in ev.stats]  # -1: no box of that size range
    out = {"map50": s[1], "map": s[0], "map75": s[2], "ar100": s[8]}
    precision = ev.eval["precision"]  # T x R x K x A x M; IoU .5, all areas, 100 detections
    curves = {}
    for k, name in enumerate(classes):
        p = precision[0, :, k, 0, 2]
        if (p > -1).any():
            curves[name] = np.where(p > -1, p, 0.0).tolist()
            if len(classes) > 1:
                out[f"ap50_{name}"] = float(np.mean(p[p > -1]))
    return {"metrics": out, "recall": ev.params.recThrs.tolist(), "curves": curves}
