"""Sweeps that optimise the cross-validated mean (`tune.cv=true`), on a real local Ray and a
real SQLite MLflow store: each trial trains every fold, reports the running mean after each,
nests its fold runs beneath its own run, and a crashed trial continues with its next fold."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

import sweeps
from pipeline.data.splits import load_splits
from pipeline.errors import ConfigError
from pipeline.tasks import tune as tune_task
from pipeline.tasks.data import ensure_data
from pipeline.tasks.tune import tune
from pipeline.tuning.cv_trial import running_report
from pipeline.tuning.driver import _scheduler
from pipeline.tuning.plan import plan_sweep

FOLDS = 3
CV = ["model=mlp", "tune.cv=true", f"data.split.folds={FOLDS}", "tune.num_cpus=2", "tune.max_concurrent_trials=2",
      "tune.metric=val/acc", "tune.mode=max"]


@pytest.mark.parametrize("overrides, message", [
    (["tune.scheduler=pbt"], r"tune\.cv=true with tune\.scheduler=pbt"),
    (["tune.workers=2"], r"tune\.cv=true .* tune\.workers > 1"),
    (["data.fold=1"], r"data\.fold=1 is set: drop the data\.fold override"),
    ([f"tune.asha.grace_period={FOLDS + 1}"], r"tune\.asha\.grace_period"),
])
def test_bad_cv_sweeps_fail_before_ray_starts(cfg_factory, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweep(cfg_factory([*CV, *overrides]))


def test_a_cv_sweep_counts_folds(cfg_factory):
    plan = plan_sweep(cfg_factory([*CV, "tune.max_epochs=3"]))
    assert (plan.steps, plan.step_key) == (FOLDS, "fold")
    assert _scheduler(plan)._max_t == FOLDS  # ASHA's rungs are folds, not epochs
    assert plan_sweep(cfg_factory(["tune.max_epochs=3"])).steps == 3
    assert plan_sweep(cfg_factory([*CV, "cv.repeats=2"])).steps == 2 * FOLDS  # every repetition's folds


@pytest.mark.integration
@pytest.mark.slow
def test_a_cv_sweep_with_repeats_trains_every_repetitions_folds(cfg_factory, tmp_path: Path):
    """With cv.repeats=r a trial's score is the mean over the r x k folds the cv stage would
    train, not over the first repetition's k."""
    cfg = cfg_factory([*CV, "data.split.folds=2", "cv.repeats=2", "tune.max_epochs=1", "tune.scheduler=fifo",
                       "tune.num_samples=1", "~tune.space", '+tune.space={optimizer.lr: "grid[0.003]"}'])
    ensure_data(cfg)
    tune(cfg)
    with (tmp_path / "out/results/tune/trials.csv").open() as f:
        (trial,) = list(csv.DictReader(f))
    assert trial["status"] == "TERMINATED" and trial["folds"] == "4", trial
    fold_dirs = sorted(p.relative_to(p.parents[2]) for p in (tmp_path / "out" / "results" / "ray").glob("*/*/cv/rep_*/fold_*"))
    assert [str(p) for p in fold_dirs] == ["cv/rep_0/fold_0", "cv/rep_0/fold_1", "cv/rep_1/fold_0", "cv/rep_1/fold_1"]
    splits = load_splits(tmp_path / "data" / "splits" / "digits")
    accs = []
    for fold, folder in enumerate(sorted((tmp_path / "out" / "results" / "ray").glob("*/*/cv/rep_*/fold_*"))):
        idx = np.load(folder / "models" / "indices.npz")
        assert set(idx["val"].tolist()) == set(splits.folds[fold].tolist())  # repetition 1 has its own folds
        accs.append(json.loads((folder / "metrics" / "train.json").read_text())["val_acc"])
    assert float(trial["cv_val_acc"]) == pytest.approx(np.mean(accs))


def test_running_report_is_the_mean_of_the_folds_so_far():
    done = [{"fold": 0, "val/acc": 0.9, "val/loss": 0.3}, {"fold": 1, "val/acc": 0.8, "val/loss": 0.5}]
    report = running_report(done, [{"epoch": 0, "val/acc": 0.8}], FOLDS)
    assert report["val/acc"] == pytest.approx(0.85) and report["val/loss"] == pytest.approx(0.4)
    assert report["fold/val/acc"] == 0.8 and report["fold"] == 1 and report["folds_done"] == 2
    assert report["cv/val/acc/std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert json.loads(report["fold_history"]) == [{"epoch": 0, "val/acc": 0.8}]


@pytest.mark.integration
@pytest.mark.slow
def test_cv_sweep_reports_running_means_and_nests_folds(cfg_factory, tmp_path: Path):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sweeps)  # the workers cannot import tests/
    cfg = cfg_factory([*CV, "tune.max_epochs=2", "tune.scheduler=fifo", "tune.max_failures=1", "tune.num_samples=1",
                       "~tune.space", '+tune.space={optimizer.lr: "grid[0.001, 0.01]"}'])
    ensure_data(cfg)
    marker = tmp_path / "crashed"
    # The first epoch of fold 1 crashes, once per sweep. Every fold trains on the data the
    # driver read, from Ray's object store.
    with sweeps.data_gone_once_loaded(tune_task, tmp_path / "data") as loads:
        best = tune(cfg, trial_callbacks=[sweeps.Crash(0, marker=str(marker), folder="fold_1")])
    assert len(loads) == 1

    with (tmp_path / "out/results/tune/trials.csv").open() as f:
        trials = {t["trial_id"]: t for t in csv.DictReader(f)}
    assert len(trials) == 2 and {t["status"] for t in trials.values()} == {"TERMINATED"}
    assert {t["folds"] for t in trials.values()} == {str(FOLDS)}
    assert {t["stop_reason"] for t in trials.values()} == {"all_folds"}
    assert sorted(t["failures"] for t in trials.values()) == ["0", "1"]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnn-pipeline").experiment_id], max_results=100)
    by_parent: dict[str, list] = {}
    for r in runs:
        by_parent.setdefault(r.data.tags.get("mlflow.parentRunId", ""), []).append(r)
    (parent,) = by_parent[""]
    children = by_parent[parent.info.run_id]
    assert len(children) == 2 and len(runs) == 1 + 2 + 2 * FOLDS  # no fold logged twice after the crash
    for child in children:
        folds = sorted(by_parent[child.info.run_id], key=lambda r: int(r.data.tags["fold"]))
        assert [r.data.tags["fold"] for r in folds] == [str(i) for i in range(FOLDS)]
        assert all(r.info.status == "FINISHED" for r in [child, *folds])
        fold_acc = [r.data.metrics["best/val/acc"] for r in folds]
        # The trial reported the running mean after each fold, and its score is the k-fold mean.
        running = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "val/acc")}
        assert sorted(running) == list(range(FOLDS))
        np.testing.assert_allclose([running[i] for i in range(FOLDS)], np.cumsum(fold_acc) / np.arange(1, FOLDS + 1))
        trial = trials[child.data.tags["trial_id"]]
        assert float(trial["cv_val_acc"]) == pytest.approx(np.mean(fold_acc))
        assert child.data.metrics["cv/val/acc"] == pytest.approx(np.mean(fold_acc))
        # Each fold run holds that fold's epochs.
        assert [m.step for m in client.get_metric_history(folds[0].info.run_id, "val/acc")] == [0, 1]

    scores = {k: float(t["cv_val_acc"]) for k, t in trials.items()}
    assert best["trial_id"] == max(scores, key=scores.get)
    written = yaml.safe_load((tmp_path / "out/results/tune/best.yaml").read_text())
    assert written["folds"] == FOLDS and written["value"] == pytest.approx(max(scores.values()))

    # Every fold validated on its own fold, never trained on it, never saw the test split,
    # and nothing was evaluated on the test split.
    splits = load_splits(tmp_path / "data" / "splits" / "digits")
    fold_dirs = sorted((tmp_path / "out" / "results" / "ray").glob("*/*/cv/fold_*"))
    assert len(fold_dirs) == 2 * FOLDS
    for folder in fold_dirs:
        idx = np.load(folder / "models" / "indices.npz")
        fold = int(folder.name.removeprefix("fold_"))
        assert set(idx["val"].tolist()) == set(splits.folds[fold].tolist())
        assert not set(idx["train"].tolist()) & set(idx["val"].tolist())
        assert not set(idx["train"].tolist()) & set(splits.test.tolist())
        assert not (folder / "metrics" / "test.json").exists()
    # The crashed trial went on with fold 1 after its retry: fold 0 was not trained again.
    crashed = next(k for k, t in trials.items() if t["failures"] == "1")
    fold0 = next(d for d in fold_dirs if crashed in str(d.parent.parent) and d.name == "fold_0")
    assert (fold0 / "metrics" / "train.json").stat().st_mtime < marker.stat().st_mtime


@pytest.mark.integration
@pytest.mark.slow
def test_cv_trial_that_diverges_stops_and_is_never_best(cfg_factory, tmp_path: Path):
    cfg = cfg_factory([*CV, "optimizer=sgd", "tune.max_epochs=2", "tune.scheduler=fifo", "tune.num_samples=1",
                       "~tune.space", '+tune.space={optimizer.lr: "grid[1e6, 0.05]"}'])
    ensure_data(cfg)
    best = tune(cfg)

    with (tmp_path / "out/results/tune/trials.csv").open() as f:
        trials = {float(t["optimizer.lr"]): t for t in csv.DictReader(f)}
    bad, good = trials[1e6], trials[0.05]
    # The first fold diverged: no further folds, no score.
    assert bad["diverged"] == "1" and bad["stop_reason"] == "diverged" and bad["folds"] == "1"
    assert bad["cv_val_acc"] == "nan"
    assert good["folds"] == str(FOLDS) and best["trial_id"] == good["trial_id"]
    assert not list((tmp_path / "out" / "results" / "ray").glob(f"*/*{bad['trial_id']}*/cv/fold_1"))
