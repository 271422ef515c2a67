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
    assert saved == json.loads(json.dumps(result))
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


def test_a_recorded_run_is_written_as_it_happened(tmp_path: Path):
    """What a parallel fold sends back: calls in order, artifacts' bytes at the time, its
    times, and a failure in a second `with` (evaluate after train) ending it FAILED."""
    import pickle

    from pipeline.tracking.mlflow_run import tracking_target
    from pipeline.tracking.recorded import RecordedRun

    artifact = tmp_path / "train.json"
    artifact.write_text('{"epochs": 2}')
    record = RecordedRun().begin(run_name="fold-0", tags={"fold": "0"}, parent_run_id=None)
    with record:
        record.log_params({"data.fold": 0})
        for step, acc in enumerate((0.5, 0.7)):
            record.log_metrics({"val/acc": acc}, step=step)
        record.log_artifact(artifact)
    artifact.write_text("changed")
    with pytest.raises(ValueError), record:
        raise ValueError("boom")
    record = pickle.loads(pickle.dumps(record))  # as Ray returns it

    target = tracking_target({"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "e",
                              "artifact_location": str(tmp_path / "artifacts")}, tmp_path)
    run = record.replay(target)
    written = run.client.get_run(run.run_id)
    assert (written.info.run_name, written.info.status) == ("fold-0", "FAILED")
    assert written.data.tags["fold"] == "0" and written.data.tags["error"] == "ValueError: boom"
    assert written.data.params == {"data.fold": "0"}
    assert [(m.step, m.value) for m in run.client.get_metric_history(run.run_id, "val/acc")] == [(0, 0.5), (1, 0.7)]
    assert written.info.start_time == record.start_args["start_time"]
    assert written.info.end_time == record.end_time
    local = run.client.download_artifacts(run.run_id, "train.json", str(tmp_path / "down"))
    assert Path(local).read_text() == '{"epochs": 2}'


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
    assert results[True]["val_acc"]["values"] == results[False]["val_acc"]["values"]
    assert results[True]["test_acc"]["values"] == results[False]["test_acc"]["values"]
