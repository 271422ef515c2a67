"""Pieces shared by the tasks: the data a run trains on, and the files naming its MLflow run."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pipeline.data.splits import Splits, check_params, load_splits
from pipeline.data.store import MANIFEST_FILE, RawDataset, file_digest, read_raw
from pipeline.errors import DataError
from pipeline.files import write_text
from pipeline.layout import Layout
from pipeline.tracking.datasets import dataset_input
from pipeline.tracking.mlflow_run import TrackedRun
from pipeline.tracking.provenance import dvc_out_hash, git_commit, tree_sha256


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous
class TrainingData:
    """What a run reads from the project's data folders: the raw arrays, the split, and the
    MLflow tags saying where both (and the code) came from.

    A sweep or a parallel cross-validation loads it once in the driver and hands it to its
    trials, folds and DDP ranks through Ray's object store (one copy per node), so those
    never open the project's folders: a cluster's nodes need not share them.
    """

    raw: RawDataset
    splits: Splits
    tags: dict[str, str]  # split_sha256, dvc_split_md5, data_manifest_sha256, git_commit, git_dirty


def load_data(cfg: DictConfig, layout: Layout, data: TrainingData | None = None, *,
              in_memory: bool | str | None = None) -> TrainingData:
    """The verified raw arrays and the split made with the configured parameters, read from
    `layout`'s folders (the images in memory or memory-mapped, as `in_memory` or else
    `data.in_memory` says); or `data`, as a driver read them there. Either way checked against
    `cfg`."""
    if data is None:
        if in_memory is None:
            in_memory = cfg.data.get("in_memory", "auto")  # absent from older runs' configs
        raw = read_raw(layout.raw, in_memory=in_memory)
        data = TrainingData(raw, load_splits(layout.splits), provenance_tags(layout))
    raw = data.raw
    if raw.manifest.get("dataset") != cfg.data.name:
        raise DataError(f"The data holds dataset {raw.manifest.get('dataset')!r} but the config asks "
                        f"data.name={cfg.data.name}.")
    expected = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)
    if tuple(raw.images.shape[1:]) != expected:
        raise DataError(f"{layout.raw} holds images of shape {tuple(raw.images.shape[1:])} (H, W, C) but the config "
                        f"declares {expected} (data.image_size, data.channels); fix the config or re-run fetch.")
    if cfg.data.num_classes is not None and len(raw.classes) != cfg.data.num_classes:
        raise DataError(f"{layout.raw} has {len(raw.classes)} classes but data.num_classes={cfg.data.num_classes}.")
    check_params(data.splits.params, {**cfg.data.split, "repeats": cfg.cv.repeats}, layout.splits)
    return data


def provenance_tags(layout: Layout) -> dict[str, str]:
    """The split's content hash, the md5 DVC recorded for it (if any), the hash of the fetched
    data's manifest (which holds every data file's sha256) and the git commit."""
    tags = {"split_sha256": tree_sha256(layout.splits), **git_commit(layout.root)}
    if (layout.raw / MANIFEST_FILE).is_file():
        tags["data_manifest_sha256"] = file_digest(layout.raw / MANIFEST_FILE)
    dvc_hash = dvc_out_hash(layout.root, "split", layout.splits)
    if dvc_hash:
        tags["dvc_split_md5"] = dvc_hash
    return tags


def dataset_inputs(layout: Layout, data: TrainingData, name: str,
                   subsets: Mapping[str, tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
    """A run's MLflow dataset inputs, `{context: (subset name, indices)}` (e.g. `{"training":
    ("train", idx)}`): digests from the hashes the data already has, plus the subset's indices
    (a nested cross-validation's inner split shares its outer split's hashes)."""
    split_hash = data.tags.get("dvc_split_md5") or data.tags.get("split_sha256", "")
    inputs = []
    for context, (subset, idx) in subsets.items():
        members = hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()[:16]
        inputs.append(dataset_input(name=name, data_hash=data.tags.get("data_manifest_sha256", ""),
                                    split_hash=split_hash, subset=f"{subset}:{members}", source=str(layout.raw),
                                    context=context, image_shape=tuple(data.raw.images.shape[1:]), rows=len(idx)))
    return inputs


def sweep_inputs(cfg: DictConfig, data: TrainingData) -> dict[str, Any]:
    """A sweep's runs' dataset inputs: `{"trial": [...], "folds": {"<i>": [...]}}`. A trial
    trains on the split's train subset; a cross-validated one (`tune.cv`) on the folds, and
    each fold run on its own part of them."""
    layout, name, splits = Layout.from_cfg(cfg), cfg.data.name, data.splits
    if not cfg.tune.get("cv"):  # no fold runs: each subset's digest is a hash over its indices
        return {"trial": dataset_inputs(layout, data, name, {"training": ("train", splits.train),
                                                             "validation": ("val", splits.val)}), "folds": {}}
    folds = {str(i): dataset_inputs(layout, data, name, {"training": (f"train-fold{i}", splits.fold(i)[0]),
                                                         "validation": (f"val-fold{i}", splits.fold(i)[1])})
             for i in range(len(splits.folds))}
    pool = np.sort(np.concatenate(splits.fold(0)))
    return {"trial": dataset_inputs(layout, data, name, {"training": ("folds", pool)}), "folds": folds}


def write_json(path: Path, data: Any) -> Path:
    """Write `data` as JSON, atomically: never a half-written file, even on a full disk."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def write_run_file(layout: Layout, run: TrackedRun) -> Path:
    """`models/run.json`: the MLflow run of these checkpoints (evaluate logs into it, report finds it)."""
    return write_json(layout.run_file, {"run_id": run.run_id, "tracking_uri": run.tracking_uri})
