"""Cross-validation: fold isolation, aggregates equal to the fold runs, parallel == sequential."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.data.splits import load_splits
from pipeline.tasks.cv import cross_validate
from pipeline.tasks.data import ensure_data
from pipeline.training.metrics import file_row

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FOLDS = 3


@pytest.fixture
def cv_cfg(cfg_factory):
    cfg = cfg_factory([f"data.split.folds={FOLDS}", "model=lenet5", "trainer.max_epochs=2"])
    ensure_data(cfg)
    return cfg


def test_folds_are_isolated_and_aggregates_match_child_runs(cv_cfg, tmp_path: Path):
    result = cross_validate(cv_cfg)
    out = tmp_path / "out"
    saved = json.loads((out / "metrics" / "cv.json").read_text())
    assert saved == json.loads(json.dumps(file_row(result)))  # the file spells `val/acc` `val_acc`
    acc = saved["val_acc"]
    assert len(acc["values"]) == FOLDS
    assert acc["ci_low"] <= acc["mean"] <= acc["ci_high"]

    splits = load_splits(tmp_path / "data" / "splits" / "digits")
    trainval = set(np.concatenate([splits.train, splits.val]).tolist())
    test = set(splits.test.tolist())
    for fold in range(FOLDS):
        idx = np.load(out / "cv" / f"fold_{fold}" / "models" / "indices.npz")
        train, val = set(idx["train"].tolist()), set(idx["val"].tolist())
        assert val == set(splits.folds[fold].tolist())  # validates on its own fold
        assert not train & val  # never trains on its own validation data
        assert not (train | val) & test  # never sees the test set
        assert train | val == trainval

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnn-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["fold"] for r in children) == [str(i) for i in range(FOLDS)]
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
    child_acc = [r.data.metrics["best/val/acc"] for r in sorted(children, key=lambda r: r.data.tags["fold"])]
    np.testing.assert_allclose(acc["values"], child_acc)
    assert acc["mean"] == pytest.approx(np.mean(child_acc))
    assert acc["std"] == pytest.approx(np.std(child_acc, ddof=1))
    assert parent.data.metrics["cv/val/acc/mean"] == pytest.approx(acc["mean"])
    test_acc = [r.data.metrics["test/acc"] for r in sorted(children, key=lambda r: r.data.tags["fold"])]
    np.testing.assert_allclose(saved["test_acc"]["values"], test_acc)


def test_parallel_folds_equal_sequential(cfg_factory, tmp_path: Path):
    from omegaconf import open_dict

    base = cfg_factory([f"data.split.folds={FOLDS}", "model=mlp", "trainer.max_epochs=2"], tracking=False)
    ensure_data(base)
    results = {}
    for parallel in (False, True):
        cfg = base.copy()
        with open_dict(cfg):
            cfg.cv.parallel = parallel
            cfg.paths.out_dir = str(tmp_path / f"out_{parallel}")
        results[parallel] = cross_validate(cfg)
    assert results[True]["val/acc"]["values"] == results[False]["val/acc"]["values"]
    assert results[True]["test/acc"]["values"] == results[False]["test/acc"]["values"]
