"""Classification accuracy: confusion matrix, OA, AA, Cohen's kappa, per-class accuracy."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted (0-based ids)."""
    t, p = np.asarray(true).ravel().astype(np.int64), np.asarray(pred).ravel().astype(np.int64)
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def accuracy_report(true: np.ndarray, pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    """OA, AA (mean recall over classes present), kappa, per-class recall, confusion matrix."""
    cm = confusion_matrix(true, pred, num_classes).astype(np.float64)
    total = cm.sum()
    if total == 0:
        raise ValueError("no pixels to score")
    support = cm.sum(axis=1)
    per_class = np.divide(np.diag(cm), support, out=np.full(num_classes, np.nan), where=support > 0)
    oa = np.trace(cm) / total
    pe = (support * cm.sum(axis=0)).sum() / total**2
    kappa = (oa - pe) / (1 - pe) if pe < 1 else 1.0
    return {"oa": float(oa), "aa": float(np.nanmean(per_class)), "kappa": float(kappa),
            "per_class": [None if np.isnan(v) else float(v) for v in per_class],
            "confusion": cm.astype(np.int64).tolist(), "pixels": int(total)}
