"""MLflow tracking end to end, with real parts only: the SQLite store, a real `mlflow server`,
a run that crashes mid-training, and a config error that must not create a run.

MLflow 3 notes these tests rely on:
- `mlflow.pytorch.log_model(name="model")` creates a *LoggedModel* (id `m-...`) whose files live
  under `<experiment artifact root>/models/<model_id>/artifacts`, not under the run's artifacts,
  so `client.list_artifacts(run_id)` does not show `model/`. The documented way to find it is
  `search_logged_models` (filterable by `source_run_id`) and to load `models:/<model_id>`;
  `runs:/<run_id>/model` is still resolved to the same logged model.
- Outside Databricks the PyTorch flavor saves with `torch.export` ("pt2") by default, which
  loads as a `GraphModule` whose `.eval()` raises; the pipeline logs its models whole
  ("pickle") instead, so `load_model` gives the eager network (tests/test_mlflow_experience.py
  uses it as a user would). `_probs` below runs a loaded model as it is.
- `mlflow.set_tracking_uri` also sets `MLFLOW_TRACKING_URI` in `os.environ`, so `evaluate`
  scopes the URI with the variable alone; the autouse fixture still guards the process
  globals, and the SQLite test checks nothing leaks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.tracking._tracking_service import utils as tracking_utils

import sweeps
from pipeline.cli import summaries
from pipeline.data.batches import to_tensors
from pipeline.errors import ConfigError
from pipeline.layout import Layout
from pipeline.tasks.common import load_data
from pipeline.tasks.data import ensure_data
from pipeline.tasks.evaluate import evaluate, predict
from pipeline.tasks.train import train
from pipeline.training.metrics import read_curves
from pipeline.training.module import Classifier
from pipeline.validation import prepare

EXPERIMENT = "cnn-pipeline"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models train fastest on one intra-op thread; with two, OpenMP spin-waiting makes
    them 3-4x slower whenever other processes compete for a 2-CPU machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory (to catch stray `mlruns/`), and MLflow's process-global
    tracking URI and its environment variable restored afterwards."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    return cwd


# ---------------------------------------------------------------------------- helpers

def _only_run(client: MlflowClient) -> Run:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment {EXPERIMENT!r}"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _test_set(cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test images, labels and the best checkpoint's probabilities (as `evaluate` computes them)."""
    cfg = prepare(cfg)
    layout = Layout.from_cfg(cfg)
    data = load_data(cfg, layout)
    raw, splits = data.raw, data.splits
    images, labels = raw.images[splits.test], raw.labels[splits.test]
    module = Classifier.load_from_checkpoint(layout.best_ckpt, map_location="cpu")
    return images, labels, predict(module.net, images)


@torch.inference_mode()
def _probs(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Softmax of a loaded MLflow model on NHWC uint8 images (its input: NCHW float in [0, 1])."""
    x = to_tensors(images, np.zeros(len(images)))[0].float().div(255)
    return torch.softmax(model(x), dim=1).numpy()


def _logged_model(client: MlflowClient, run: Run):
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.name for m in models] == ["model"]
    assert models[0].status.to_int() == mlflow.entities.LoggedModelStatus.READY.to_int()
    return models[0]


def _check_loaded_model(uri: str, model_uri: str, cfg) -> None:
    mlflow.set_tracking_uri(uri)  # load_model resolves models:/ and runs:/ URIs through it
    loaded = mlflow.pytorch.load_model(model_uri)
    images, labels, expected = _test_set(cfg)
    got = _probs(loaded, images)
    assert got.shape == expected.shape == (len(labels), 10)
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def _test_json(cfg) -> dict:
    """metrics/test.json's test figures by metric name (the file spells `test/acc` `test_acc`)."""
    written = json.loads((Path(cfg.paths.out_dir) / "metrics" / "test.json").read_text())
    return {k.removeprefix("test_"): v for k, v in written.items()}


def _check_test_metrics(run: Run, cfg) -> None:
    written = _test_json(cfg)
    for key in ("acc", "f1_macro", "loss"):
        assert run.data.metrics[f"test/{key}"] == pytest.approx(written[key], rel=1e-12)
    assert written["acc"] > 0.5  # 2 epochs on digits: far above chance (0.1)


# ---------------------------------------------------------------------------- SQLite store

@pytest.mark.integration
@pytest.mark.slow
def test_train_evaluate_tracks_one_run_in_sqlite(digits_cfg, tmp_path: Path,
                                                 isolated_mlflow: Path) -> None:
    best = train(digits_cfg)
    evaluate(digits_cfg)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # evaluate leaves no process-wide URI behind
    assert tracking_utils._tracking_uri is None

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = _only_run(client)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.info.end_time is not None and run.info.end_time >= run.info.start_time
    run_file = json.loads((tmp_path / "out" / "models" / "run.json").read_text())
    assert run_file == {"run_id": run_id, "tracking_uri": uri}

    params = run.data.params
    assert params["optimizer.lr"] == "0.001"
    assert params["model.name"] == "minivgg"
    assert params["data.name"] == "digits"
    assert params["trainer.max_epochs"] == "2"
    assert params["model.arch"] == "minivgg"
    assert not any(k.startswith("model/model/") for k in params)
    assert int(params["model/params"]) == best["model/params"]

    for key in ("val/acc", "train/loss", "lr"):
        assert _steps(client, run_id, key) == [0, 1], key
    history = client.get_metric_history(run_id, "val/acc")
    assert max(m.value for m in history) == pytest.approx(best["val/acc"])
    # The curves file keeps the columns dvc.yaml plots (`val_acc`); read back, the code's `val/acc`.
    curves_file = tmp_path / "out" / "plots" / "train_curves.json"
    assert {"epoch", "train_loss", "val_acc", "lr"} <= set(json.loads(curves_file.read_text())[0])
    assert sorted(r["val/acc"] for r in read_curves(curves_file)) == sorted(m.value for m in history)

    metrics = run.data.metrics
    _check_test_metrics(run, digits_cfg)
    assert metrics["model/params"] > 0 and metrics["model/macs"] > 0
    assert metrics["model/params"] == best["model/params"]
    assert metrics["epochs"] == 2

    tags = run.data.tags
    assert tags["dataset"] == "digits"
    assert tags["model"] == "minivgg"
    assert len(tags["split_sha256"]) == 64
    assert "error" not in tags

    # Run artifacts: listed by MLflow and physically inside the configured folder.
    artifact_root = tmp_path / "mlartifacts"
    assert run.info.artifact_uri.startswith(artifact_root.as_uri() + "/")
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert {"confusion.png", "learning_curves.png", "config.yaml", "test.json"} <= listed
    on_disk = {p.name for p in (artifact_root / run_id / "artifacts").iterdir()}
    assert listed <= on_disk

    # The logged model (MLflow 3: a LoggedModel beside the run, not a run artifact).
    model = _logged_model(client, run)
    assert model.model_uri == f"models:/{model.model_id}"
    assert model.artifact_location.startswith(artifact_root.as_uri() + "/")
    assert (artifact_root / "models" / model.model_id / "artifacts" / "MLmodel").is_file()
    _check_loaded_model(uri, model.model_uri, digits_cfg)
    _check_loaded_model(uri, f"runs:/{run_id}/model", digits_cfg)  # the MLflow 2 style URI

    # Nothing escaped into the working directory (no ./mlruns, ./mlartifacts, ./mlflow.db).
    assert list(isolated_mlflow.iterdir()) == []


# ---------------------------------------------------------------------------- mlflow server

@pytest.mark.integration
@pytest.mark.slow
def test_train_evaluate_against_mlflow_server(mlflow_server, cfg_factory, tmp_path: Path,
                                              isolated_mlflow: Path) -> None:
    url, artifacts = mlflow_server["url"], mlflow_server["artifacts"]
    cfg = cfg_factory([f"tracking.tracking_uri={url}"])
    ensure_data(cfg)
    metrics = {**train(cfg), **evaluate(cfg)}

    client = MlflowClient(url)
    run = _only_run(client)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    # What `pipeline train` ends with: the run's page on the server (no `mlflow ui` to start).
    lines = summaries.train(cfg, metrics)
    assert lines[-1] == f"run: {run_id}  {url}/#/experiments/{run.info.experiment_id}/runs/{run_id}", lines
    assert json.loads((tmp_path / "out" / "models" / "run.json").read_text())["run_id"] == run_id
    assert run.data.params["model.name"] == "minivgg"
    for key in ("val/acc", "train/loss", "lr"):
        assert _steps(client, run_id, key) == [0, 1], key
    _check_test_metrics(run, cfg)

    # Artifacts went through the server's proxy into its --artifacts-destination.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert {"confusion.png", "config.yaml"} <= {a.path for a in client.list_artifacts(run_id)}
    experiment_dir = artifacts / run.info.experiment_id
    assert (experiment_dir / run_id / "artifacts" / "confusion.png").is_file()
    model = _logged_model(client, run)
    assert model.artifact_location.startswith("mlflow-artifacts:/")
    assert (experiment_dir / "models" / model.model_id / "artifacts" / "MLmodel").is_file()
    _check_loaded_model(url, model.model_uri, cfg)

    # The configured local store and artifact folder are not used with an http URI.
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlartifacts").exists()
    assert list(isolated_mlflow.iterdir()) == []


# ---------------------------------------------------------------------------- failures

@pytest.mark.integration
def test_crash_mid_training_ends_run_failed(cfg_factory, tmp_path: Path) -> None:
    cfg = cfg_factory(epochs=3)
    ensure_data(cfg)
    with pytest.raises(RuntimeError, match="injected crash at epoch 1"):
        train(cfg, callbacks=[sweeps.Crash(1)])

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = _only_run(client)
    assert run.info.status == "FAILED"
    assert run.info.end_time is not None and run.info.end_time >= run.info.start_time
    assert "RuntimeError" in run.data.tags["error"]
    assert "injected crash at epoch 1" in run.data.tags["error"]
    for key in ("val/acc", "train/loss", "lr"):
        steps = _steps(client, run.info.run_id, key)
        assert steps[0] == 0 and max(steps) <= 1, (key, steps)  # epoch 2 never ran
    assert run.data.metrics["model/params"] > 0
    assert "epochs" not in run.data.metrics  # the post-training summary was never logged


def test_config_error_creates_no_run(digits_cfg, cfg_factory, tmp_path: Path) -> None:
    # Data is prepared, so only validation stands between this config and a tracked run.
    bad = cfg_factory(["optimizer.lr=-1"])
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        train(bad)

    db = tmp_path / "mlflow.db"
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        experiments = client.search_experiments()
        assert client.search_runs([e.experiment_id for e in experiments]) == []
    assert not (tmp_path / "out" / "models" / "run.json").exists()
    assert not (tmp_path / "mlartifacts").exists()
