"""mIoU from one confusion matrix over all scenes (the ScanNet benchmark convention: points whose
ground truth is ignored never count; a class absent from both ground truth and predictions has no
IoU and is left out of the mean)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = ground truth, columns = prediction; label < 0 is skipped."""
    valid = label >= 0
    index = label[valid].astype(np.int64) * num_classes + prediction[valid].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(confusion: np.ndarray, classes: list[int] | None = None) -> float:
    """Mean of the defined IoUs, over `classes` if given (shared classes across datasets)."""
    iou = iou_per_class(confusion)
    if classes is not None:
        iou = iou[classes]
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
