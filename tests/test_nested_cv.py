"""Nested cross-validation: the index sets of each outer fold (disjoint, stratified,
deterministic), the refused combinations (exit 2), and one real run end to end on a local Ray
and a SQLite MLflow store, checked for leaks through the indices every model trained on."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.cli.stages import STAGES
from pipeline.data.nested import derived_seed, outer_fold
from pipeline.data.splits import load_splits, make_splits
from pipeline.errors import ConfigError
from pipeline.tasks.cv import check_cv, cv
from pipeline.tasks.data import ensure_data
from procs import BIN, git_project, project_env, start_stage, wait_until

# Uneven classes (one small), so stratification has something to get wrong.
LABELS = np.repeat(np.arange(4), [40, 31, 25, 12])


def _splits(seed: int = 0, folds: int = 3):
    return make_splits(LABELS, val_fraction=0.15, test_fraction=0.15, folds=folds, seed=seed)


def _set(a: np.ndarray) -> set[int]:
    return set(a.tolist())


@pytest.mark.parametrize("fold", [0, 1, 2])
def test_an_outer_fold_never_lets_its_held_out_fold_into_the_sweep_or_the_refit(fold):
    splits = _splits()
    outer = outer_fold(splits, LABELS, fold=fold, inner_folds=3, val_fraction=0.2)
    held, test = _set(splits.folds[fold]), _set(splits.test)
    train_part = _set(np.concatenate([f for j, f in enumerate(splits.folds) if j != fold]))
    assert _set(outer.held_out) == held and outer.fold == fold

    inner = outer.inner
    assert len(inner.folds) == 3
    for i, f in enumerate(inner.folds):
        assert not _set(f) & held and not _set(f) & test
        for g in inner.folds[i + 1:]:
            assert not _set(f) & _set(g)
    assert set().union(*map(_set, inner.folds)) == train_part  # the inner folds partition the training part
    for i in range(3):  # every inner train/val pair the sweep's trials use
        tr, va = inner.fold(i)
        assert not (_set(tr) | _set(va)) & held and not _set(tr) & _set(va)
    assert not (_set(inner.train) | _set(inner.val)) & held
    assert _set(inner.test) == test  # the test split stays the test split (never trained or chosen on)
    assert inner.params["folds"] == 3 and inner.params["seed"] == 0  # what the sweep's configs check

    refit = outer.refit
    assert not _set(refit.train) & _set(refit.val)
    assert _set(refit.train) | _set(refit.val) == train_part
    assert not (_set(refit.train) | _set(refit.val)) & held
    assert refit.folds == () and refit.params["folds"] == 3  # the user's split parameters


def test_inner_folds_and_refit_validation_are_stratified():
    splits = _splits()
    outer = outer_fold(splits, LABELS, fold=1, inner_folds=3, val_fraction=0.2)
    part = np.concatenate([f for j, f in enumerate(splits.folds) if j != 1])
    for cls in range(4):
        n = int((LABELS[part] == cls).sum())
        per_fold = [int((LABELS[f] == cls).sum()) for f in outer.inner.folds]
        assert sum(per_fold) == n
        assert set(per_fold) <= {n // 3, -(-n // 3)}  # floor or ceil of n/k: as even as it can be
        # The refit's validation part: val_fraction of each class, rounded (stratified_split's rule).
        assert int((LABELS[outer.refit.val] == cls).sum()) == int(round(n * 0.2))


def test_outer_folds_are_deterministic_and_seeded_per_fold():
    a = outer_fold(_splits(), LABELS, fold=0, inner_folds=3, val_fraction=0.2)
    b = outer_fold(_splits(), LABELS, fold=0, inner_folds=3, val_fraction=0.2)
    for x, y in zip(a.inner.folds, b.inner.folds):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.refit.val, b.refit.val)
    # Another split seed deals other inner folds; each fold and use has a seed of its own.
    c = outer_fold(_splits(seed=5), LABELS, fold=0, inner_folds=3, val_fraction=0.2)
    assert any(not np.array_equal(x, y) for x, y in zip(a.inner.folds, c.inner.folds))
    seeds = {derived_seed(0, fold, use) for fold in range(5) for use in (1, 2)}
    assert len(seeds) == 10 and derived_seed(0, 1, 1) == derived_seed(0, 1, 1)


def test_too_few_samples_per_class_or_no_validation_part_are_config_errors():
    splits = _splits()
    # Class 3 has 12 samples, about 8 of them in an outer fold's training part.
    with pytest.raises(ConfigError, match=r"cv\.inner_folds=9 is more than the \d samples of class 3"):
        outer_fold(splits, LABELS, fold=0, inner_folds=9, val_fraction=0.2)
    with pytest.raises(ConfigError, match=r"data\.split\.val_fraction=0: set it above 0"):
        outer_fold(splits, LABELS, fold=0, inner_folds=3, val_fraction=0.0)


NESTED = ["model=mlp", "cv.nested=true", "data.split.folds=2", "cv.inner_folds=2"]


@pytest.mark.parametrize("overrides, message", [
    (["cv.parallel=true"], r"cv\.nested=true with cv\.parallel=true"),
    (["cv.repeats=2"], r"cv\.nested=true with cv\.repeats=2: .* set cv\.repeats=1"),
    (["tune.objectives=[{val/acc: max}, {model/macs: min}]"], r"cv\.nested=true with tune\.objectives"),
    (["tune.scheduler=pbt"], r"cv\.nested=true with tune\.scheduler=pbt"),
    (["tune.workers=2"], r"tune\.workers > 1"),
    (["data.fold=1"], r"data\.fold=1 is set"),
    (["tune.resume=true"], r"set tune\.resume=false"),
    (["cv.inner_folds=1"], r"cv\.inner_folds=1 is out of range"),
    (["cv.nested=yes"], r"cv\.nested must be true or false"),
    (["tune.asha.grace_period=3"], r"each outer fold's sweep would fail: tune\.asha\.grace_period=3"),
])
def test_bad_nested_settings_fail_before_anything_runs(cfg_factory, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_cv(cfg_factory([*NESTED, *overrides]))


@pytest.mark.integration
@pytest.mark.parametrize("overrides, key", [
    (["cv.parallel=true"], "cv.parallel"),
    (["cv.inner_folds=200"], "cv.inner_folds"),  # the data decides: digits has ~90 per class and fold
])
def test_the_cli_exits_2_naming_the_key(tmp_path: Path, overrides, key):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    proc = subprocess.run([str(BIN / "pipeline"), "cv", *NESTED, "trainer.max_epochs=1", *overrides],
                          cwd=tmp_path, env=project_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("outputs/*/*/metrics"))  # nothing written
    assert not (tmp_path / "results" / "ray").exists()  # no sweep started


@pytest.mark.integration
@pytest.mark.slow
def test_nested_cv_end_to_end(cfg_factory, tmp_path: Path, local_ray):
    cfg = cfg_factory([*NESTED, "tune.num_samples=2", "tune.max_epochs=1", "tune.scheduler=fifo",
                       "tune.max_concurrent_trials=2"], epochs=1)
    ensure_data(cfg)
    assert STAGES["cv"] == "pipeline.tasks.cv:cv"  # the DVC cv stage runs this same task
    result = cv(cfg)
    out = tmp_path / "out"
    saved = json.loads((out / "metrics" / "cv.json").read_text())
    assert saved["nested"] is True and saved["folds"] == 2 and saved["inner_folds"] == 2
    acc = saved["outer_acc"]
    assert len(acc["values"]) == 2 and acc["mean"] == pytest.approx(np.mean(acc["values"]))
    assert acc["ci_low"] <= acc["mean"] <= acc["ci_high"]
    assert result["outer/acc"]["values"] == acc["values"]
    inner = f"inner_{cfg.tune.metric.replace('/', '_')}"  # each sweep's own score of its pick
    assert {"test_acc", "test_loss", "test_f1_macro", inner, "outer_loss", "outer_f1_macro"} <= set(saved)
    space = {"optimizer.lr", "scheduler.decay", "regularizer.dropout"}

    splits = load_splits(tmp_path / "data" / "splits" / "digits")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnn-pipeline").experiment_id], max_results=200)
    by_parent: dict[str, list] = {}
    for r in runs:
        by_parent.setdefault(r.data.tags.get("mlflow.parentRunId", ""), []).append(r)
    (top,) = by_parent[""]
    assert top.data.tags["nested_cv"] == "true"
    assert top.data.metrics["nested/outer/acc/mean"] == pytest.approx(acc["mean"])
    outers = sorted(by_parent[top.info.run_id], key=lambda r: int(r.data.tags["outer_fold"]))
    assert [r.data.tags["outer_fold"] for r in outers] == ["0", "1"]
    # Per outer fold: its run > (the sweep > 2 trials > 2 inner folds each) + the refit.
    assert len(runs) == 1 + 2 * (1 + 1 + 2 + 2 * 2 + 1) and {r.info.status for r in runs} == {"FINISHED"}

    for fold, (choice, outer_run) in enumerate(zip(saved["choices"], outers)):
        assert choice["fold"] == fold and set(choice["overrides"]) >= space
        assert choice["outer_acc"] == acc["values"][fold]
        assert outer_run.data.metrics["outer/acc"] == pytest.approx(choice["outer_acc"])
        children = by_parent[outer_run.info.run_id]
        (sweep,) = [r for r in children if "sweep" in r.data.tags and "trial_id" not in r.data.tags]
        (refit,) = [r for r in children if r.data.tags.get("nested_cv") == "refit"]
        assert sweep.data.tags["best_trial_id"] == choice["trial_id"] == outer_run.data.tags["chosen_trial"]
        assert refit.data.tags["tuned_trial"] == choice["trial_id"]  # the refit applied that trial's choice
        assert refit.data.tags["tuned_from"] == sweep.info.run_id
        trials = by_parent[sweep.info.run_id]
        assert len(trials) == 2
        for trial in trials:
            assert sorted(r.data.tags["fold"] for r in by_parent[trial.info.run_id]) == ["0", "1"]
        assert float(refit.data.params["optimizer.lr"]) == pytest.approx(float(choice["overrides"]["optimizer.lr"]))

        # No leak: nothing the sweep or the refit trained or validated on is in the held-out fold.
        held = _set(splits.folds[fold])
        part = _set(splits.fold(fold)[0])
        inner_dirs = sorted((out / "results" / "ray").glob(f"*-nested-outer{fold}-*/*/cv/fold_*"))
        assert len(inner_dirs) == 2 * 2
        seen_val: set[int] = set()
        for folder in inner_dirs:
            idx = np.load(folder / "models" / "indices.npz")
            assert not (_set(idx["train"]) | _set(idx["val"])) & held
            assert _set(idx["train"]) | _set(idx["val"]) == part
            seen_val |= _set(idx["val"])
        assert seen_val == part
        idx = np.load(out / "cv" / "nested" / f"outer_{fold}" / "models" / "indices.npz")
        assert not (_set(idx["train"]) | _set(idx["val"])) & held
        assert _set(idx["train"]) | _set(idx["val"]) == part
        scored = json.loads((out / "cv" / "nested" / f"outer_{fold}" / "metrics" / "outer.json").read_text())
        assert scored["sizes"]["held_out"] == len(held) and scored["outer_acc"] == choice["outer_acc"]


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=project_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_dvc_cv_stage_runs_nested_cv_when_asked(tmp_path: Path):
    """The real `dvc exp run` of the cv stage with cv.nested=true, in a temporary git
    repository holding this working tree: its own private Ray, its own MLflow store."""
    project = git_project(tmp_path / "project")
    sets = ["cv.nested=true", "cv.inner_folds=2", "model=mlp", "data.split.folds=2", "tune.num_samples=2",
            "tune.max_epochs=1", "trainer.max_epochs=1", "tune.scheduler=fifo", "tune.num_cpus=2"]
    out = _run([str(BIN / "dvc"), "exp", "run", "cv", *(a for s in sets for a in ("-S", s))], project)
    assert "Running stage 'cv'" in out and "Running stage 'train'" not in out
    saved = json.loads((project / "metrics" / "cv.json").read_text())
    assert saved["nested"] is True and len(saved["outer_acc"]["values"]) == 2 and len(saved["choices"]) == 2
    for fold in range(2):
        assert (project / "cv" / "nested" / f"outer_{fold}" / "results" / "tune" / "best.yaml").is_file()
    assert "outer_acc" in _run([str(BIN / "dvc"), "metrics", "show", "--json"], project)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_nested_cv_ends_its_run_tree_killed(cfg_factory, tmp_path: Path, sig, status):
    """A real signal to the cv stage's process in the middle of an outer fold's sweep."""
    cfg = cfg_factory([*NESTED, "tune.num_samples=2", "tune.max_epochs=500", "tune.scheduler=fifo", "tune.num_cpus=2",
                       "regularizer.early_stopping.enabled=false"])
    ensure_data(cfg)
    log = tmp_path / "stage.log"
    db = tmp_path / "mlflow.db"
    with log.open("w") as out:
        proc = start_stage("cv", cfg, tmp_path, out)
        try:
            # A trial's first epoch of its first inner fold (its checkpoint; it reports per fold).
            wait_until(lambda: any(tmp_path.glob("out/results/ray/*-nested-outer0-*/*/cv/fold_0/models/last.ckpt")),
                       proc, log)
            proc.send_signal(sig)
            assert proc.wait(timeout=180) == status, log.read_text()[-3000:]
        finally:
            proc.kill()
    assert "nested cross-validation cannot resume a sweep" in log.read_text()
    statuses = dict(_query(db, "SELECT name, status FROM runs"))
    assert "RUNNING" not in statuses.values(), statuses
    top = [s for n, s in statuses.items() if n.startswith("nested-cv-") and n.endswith("-digits")]
    outer = [s for n, s in statuses.items() if n.endswith("-outer0")]
    assert top == ["KILLED"] and outer == ["KILLED"], statuses
    assert not (tmp_path / "out" / "metrics" / "cv.json").exists()


def _query(db: Path, sql: str) -> list[tuple]:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute(sql).fetchall()
    except sqlite3.Error:  # not created yet, or being written
        return []
