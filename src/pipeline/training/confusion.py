"""The confusion matrix and the per-class scores read off it, as scikit-learn computes them
(`confusion_matrix`, `precision_recall_fscore_support(..., zero_division=0)`), in numpy:
importing `sklearn.metrics` costs 1.3 s here in every process that evaluates (the evaluate
and report stages, each cross-validation fold's worker)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def confusion_matrix(labels: ArrayLike, pred: ArrayLike, n_classes: int) -> np.ndarray:
    """Counts of (actual, predicted) class pairs: row = actual, column = predicted."""
    pairs = np.asarray(labels, dtype=np.int64) * n_classes + np.asarray(pred, dtype=np.int64)
    return np.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support of confusion matrix `cm`; a score whose
    denominator is 0 (a class never predicted, or absent) is 0."""
    tp = np.diag(cm).astype(float)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros_like(tp), where=den > 0)

    # F1 as 2 tp / (2 tp + fp + fn), scikit-learn's form, not from the rounded p and r.
    return ratio(tp, predicted), ratio(tp, support), ratio(2 * tp, predicted + support), support
