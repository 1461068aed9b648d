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
    """IoU per ground-truth class of a (C, C) matrix, or of a (C, C + 1) shared-class matrix whose
    last column counts predictions of classes the target does not have."""
    classes = confusion.shape[0]
    tp = np.diag(confusion[:, :classes]).astype(np.float64)
    union = confusion[:, :classes].sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(confusion: np.ndarray, classes: list[int] | None = None) -> float:
    """Mean of the defined IoUs, over `classes` if given (shared classes across datasets)."""
    iou = iou_per_class(confusion)
    if classes is not None:
        iou = iou[classes]
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


class SharedLabels:
    """Scoring across label spaces (paper Table 5): only classes both datasets have count.

    A target point whose class is not shared is ignored; a prediction of a source class the target
    does not have is wrong for the point's true class and counts for no class."""

    def __init__(self, source_names: list[str], target_names: list[str], shared: list[tuple[str, str]]):
        self.names = [t for _, t in shared]
        self.source_to_shared = np.full(len(source_names), -1)
        self.target_to_shared = np.full(len(target_names), -1)
        for index, (s, t) in enumerate(shared):
            self.source_to_shared[source_names.index(s)] = index
            self.target_to_shared[target_names.index(t)] = index

    def confusion(self, prediction: np.ndarray, label: np.ndarray) -> np.ndarray:
        """(S, S + 1): rows shared ground truth, columns shared prediction + 'not a shared class'."""
        shared = len(self.names)
        truth = np.where(label >= 0, self.target_to_shared[np.maximum(label, 0)], -1)
        guess = self.source_to_shared[prediction]
        guess = np.where(guess >= 0, guess, shared)
        valid = truth >= 0
        index = truth[valid] * (shared + 1) + guess[valid]
        return np.bincount(index, minlength=shared * (shared + 1)).reshape(shared, shared + 1)
