"""Metric names: `split/metric` in the code, DVC's file spelling only at the boundary."""

from __future__ import annotations

import json
from pathlib import Path

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
