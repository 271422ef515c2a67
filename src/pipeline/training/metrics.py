"""Metric names: `split/metric` (`val/acc`) everywhere in the code, one spelling per metric.

Lightning, MLflow and Ray Tune take `val/acc` as it is. Only DVC's files spell it `val_acc`
(`plots/train_curves.json`, `metrics/cv.json`, `results/tune/curves.json`, `trials.csv`):
dvc.yaml's `plots:` and every committed experiment name those columns, and renaming them
would break `dvc plots diff` and `dvc metrics diff` against earlier revisions. So the
conversion happens here and only here: `file_key` on the way out, `read_curves` on the way in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
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


def ties_better(score: float, tie: float | None, best_score: float, best_tie: float) -> bool:
    """Whether an epoch that scored `score` equal to the best so far (to float tolerance) wins on
    its `tie` value (lower is better: validation loss). The one rule for the best checkpoint,
    early stopping and the summary's best epoch, so all three name the same epoch."""
    return tie is not None and math.isclose(score, best_score, rel_tol=1e-5, abs_tol=1e-8) and tie < best_tie


def best_epoch(values: Sequence[float], ties: Sequence[float] | None = None) -> int:
    """The index of the best of `values` (higher is better), ties to the lower of `ties`, by the
    rule the best checkpoint keeps (-1 when there are none)."""
    best = -1
    for epoch, value in enumerate(values):
        tie = ties[epoch] if ties is not None else None
        if best < 0 or value > values[best] or ties_better(value, tie, values[best],
                                                           ties[best] if ties is not None else math.inf):
            best = epoch
    return best
