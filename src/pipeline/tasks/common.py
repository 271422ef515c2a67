"""Pieces shared by the train and evaluate tasks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.data.splits import Splits, load_splits
from pipeline.data.store import RawDataset, read_raw
from pipeline.errors import DataError
from pipeline.layout import Layout
from pipeline.tracking.mlflow_run import TrackedRun


def load_data(cfg: DictConfig, layout: Layout) -> tuple[RawDataset, Splits]:
    """The verified raw arrays and the split made with the configured parameters."""
    raw = read_raw(layout.raw)
    expected = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)
    if tuple(raw.images.shape[1:]) != expected:
        raise DataError(f"{layout.raw} holds images of shape {tuple(raw.images.shape[1:])} (H, W, C) but the config "
                        f"declares {expected} (data.image_size, data.channels); fix the config or re-run fetch.")
    if cfg.data.num_classes is not None and len(raw.classes) != cfg.data.num_classes:
        raise DataError(f"{layout.raw} has {len(raw.classes)} classes but data.num_classes={cfg.data.num_classes}.")
    splits = load_splits(layout.splits, expect=dict(cfg.data.split))
    return raw, splits


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def write_run_file(layout: Layout, run: TrackedRun) -> Path:
    """`models/run.json`: the MLflow run of these checkpoints (evaluate logs into it, report finds it)."""
    return write_json(layout.run_file, {"run_id": run.run_id, "tracking_uri": run.tracking_uri})
