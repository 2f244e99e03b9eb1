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
