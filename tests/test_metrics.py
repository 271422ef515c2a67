"""Metric names: `split/metric` in the code, DVC's file spelling only at the boundary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.training.confusion import class_scores, confusion_matrix
from pipeline.training.metrics import (
    EPOCH_METRICS,
    LEARNING_CURVES,
    file_key,
    file_row,
    read_curves,
)


def test_curves_round_trip_through_dvc_spelling(tmp_path: Path) -> None:
    rows = [{"epoch": e, **{k: 0.5 + e for k in EPOCH_METRICS}, "train/loss_l2": 0.01, "time/epoch_s": 1.5}
            for e in range(2)]
    path = tmp_path / "train_curves.json"
    path.write_text(json.dumps([file_row(r) for r in rows]))
    on_disk = json.loads(path.read_text())[0]
    assert set(on_disk) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                            "train_loss_l2", "time_epoch_s"}  # the columns dvc.yaml's plots name
    assert read_curves(path) == rows
    assert read_curves(tmp_path / "absent.json") == []


def test_every_learning_curve_is_an_epoch_metric_with_a_file_name() -> None:
    assert set(LEARNING_CURVES) < set(EPOCH_METRICS)
    assert [file_key(k) for k in LEARNING_CURVES] == ["train_loss", "train_acc", "val_loss", "val_acc"]


@pytest.mark.parametrize("n_classes, absent", [(10, ()), (5, (2,)), (3, (0, 1))])
def test_confusion_and_class_scores_equal_scikit_learns(n_classes: int, absent: tuple[int, ...]) -> None:
    """The numpy confusion matrix and per-class scores are scikit-learn's, classes never
    predicted or absent from the labels included (their undefined scores are 0)."""
    from sklearn.metrics import confusion_matrix as sk_confusion
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(n_classes)
    present = [c for c in range(n_classes) if c not in absent]
    labels = rng.choice(present, size=300)
    pred = np.where(rng.random(300) < 0.7, labels, rng.choice(present[:max(1, len(present) - 1)], size=300))
    ids = list(range(n_classes))
    cm = confusion_matrix(labels, pred, n_classes)
    np.testing.assert_array_equal(cm, sk_confusion(labels, pred, labels=ids))
    expected = precision_recall_fscore_support(labels, pred, labels=ids, zero_division=0)
    for ours, theirs in zip(class_scores(cm), expected):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)
    assert all(class_scores(cm)[i][c] == 0 for i in range(3) for c in absent)
