"""A cross-validated Tune trial (`tune.cv=true`): the trial trains one model per fold and
reports, after each fold, the running mean over the folds done so far.

So the sweep optimises the k-fold mean rather than one validation split, and ASHA or
HyperBand can drop a trial whose first folds already trail (their time unit is then the
fold). Folds validate on fold i and train on the others, exactly as the `cv` stage does
(`pipeline.config.fold_config`), but nothing is evaluated on the test split: choosing a
configuration by its test score would leak the test set into the choice.

A checkpoint after every fold holds the finished folds' results, so a retried or resumed
trial continues with the next fold instead of starting over.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from pipeline.training.metrics import EPOCH_METRICS, read_curves
from pipeline.tuning.trial import TrainFn

STATE_FILE = "folds.json"


def running_report(done: Sequence[Mapping[str, Any]], history: Sequence[Mapping[str, Any]],
                   folds: int) -> dict[str, Any]:
    """The report after the latest fold of `done` (each fold's best-epoch metrics, in fold
    order): every metric of EPOCH_METRICS as the mean over the folds so far, plus the latest
    fold's own figures (`fold/...`), its per-epoch curve (JSON) and the spread so far."""
    last = done[-1]
    out: dict[str, Any] = {"fold": int(last["fold"]), "folds_done": len(done), "folds": folds}
    for key in EPOCH_METRICS:
        values = [float(d[key]) for d in done if key in d]
        if len(values) == len(done):
            out[key] = statistics.fmean(values)
            out[f"fold/{key}"] = float(last[key])
    accs = [float(d["val/acc"]) for d in done if "val/acc" in d]
    out["cv/val/acc/std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
    out["fold/best_epoch"] = int(last.get("best_epoch", -1))
    out["fold/epochs"] = int(last.get("epochs", 0))
    out["fold_history"] = json.dumps(list(history))
    return out


def _diverged(rows: Sequence[Mapping[str, Any]]) -> bool:
    return any(not math.isfinite(float(r.get(k, 0.0))) for r in rows for k in ("train/loss", "val/loss"))


def run_cv_trial(plain: dict[str, Any], train: TrainFn, *, callbacks: Sequence[Callback] = (),
                 data: Any = None) -> None:
    """Train `plain` (a trial's resolved config) with `train` on every fold (on `data`, train's
    `data=`, if given); report after each one."""
    import ray
    from omegaconf import OmegaConf
    from ray import tune

    from pipeline.config import fold_config, fold_count

    cfg = OmegaConf.create(plain)
    folds = fold_count(cfg)  # with cv.repeats, every repetition's folds, as the cv stage trains
    done: list[dict[str, Any]] = []
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            done = json.loads((Path(folder) / STATE_FILE).read_text())["folds"]
    placement = {"gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
                 "node_id": ray.get_runtime_context().get_node_id()}
    for fold in range(len(done), folds):
        fold_cfg = fold_config(cfg, fold)
        metrics = train(fold_cfg, callbacks=callbacks, figures=False, data=data)
        history = read_curves(Path(fold_cfg.paths.out_dir) / "plots" / "train_curves.json")
        done.append({"fold": fold, **{k: v for k, v in metrics.items() if k in EPOCH_METRICS},
                     "best_epoch": metrics.get("best_epoch", -1), "epochs": metrics.get("epochs", 0)})
        report = {**running_report(done, history, folds), **placement}
        placement = {}  # once per (re)start, as TuneReporter does
        if _diverged(history):
            report.update({"diverged": 1, "val/acc": math.nan})
            tune.report(report)
            return
        report["diverged"] = 0
        with tempfile.TemporaryDirectory(prefix="trial-folds-") as folder:
            (Path(folder) / STATE_FILE).write_text(json.dumps({"folds": done}))
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))
