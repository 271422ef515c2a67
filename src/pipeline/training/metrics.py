"""Metric names: `split/metric` (`val/acc`) everywhere in the code, one spelling per metric.

Lightning, MLflow and Ray Tune take `val/acc` as it is. Only DVC's files spell it `val_acc`
(`plots/train_curves.json`, `metrics/cv.json`, `results/tune/curves.json`, `trials.csv`):
dvc.yaml's `plots:` and every committed experiment name those columns, and renaming them
would break `dvc plots diff` and `dvc metrics diff` against earlier revisions. So the
conversion happens here and only here: `file_key` on the way out, `read_curves` on the way in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LEARNING_CURVES = ("train/loss", "train/acc", "val/loss", "val/acc")  # what a sweep may optimise
EPOCH_METRICS = (*LEARNING_CURVES, "lr")  # logged every epoch, reported to Tune, kept as curves


def file_key(name: str) -> str:
    """`val/acc` -> `val_acc` (`train/loss_l2` -> `train_loss_l2`): the name in DVC's files."""
    return name.replace("/", "_")


def file_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row or summary with its keys as DVC's files spell them."""
    return {file_key(k): v for k, v in row.items()}


def read_curves(path: Path) -> list[dict[str, Any]]:
    """The per-epoch rows of a `train_curves.json` (none if absent), keys spelled `split/metric`.

    Only the first underscore is a slash: every key of a row but `epoch` and `lr` is a
    `split/metric` name, and only a metric's own name (`loss_l2`, `epoch_s`) has another.
    """
    rows = json.loads(path.read_text()) if path.exists() else []
    return [{k.replace("_", "/", 1): v for k, v in row.items()} for row in rows]
