"""A sweep whose trial trains with Ray Train (TorchTrainer + Lightning DDP, gloo on CPU):
`tune.workers=2` ranks of 1 CPU each on a 2-CPU local Ray, reported to Tune and MLflow as a
single-worker trial is."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

import sweeps
from pipeline.errors import PipelineError
from pipeline.tasks.prepare import ensure_data
from pipeline.tuning.driver import run_sweep

DDP = ["model=mlp", "tune.num_cpus=2", "tune.workers=2", "tune.resources.cpu=1", "tune.num_samples=1",
       "tune.scheduler=fifo"]


@pytest.mark.integration
@pytest.mark.slow
def test_ddp_trial_trains_on_two_workers(local_ray, cfg_factory, tmp_path: Path):
    cfg = cfg_factory([*DDP, "tune.max_epochs=2"])
    ensure_data(cfg)
    best = run_sweep(cfg)

    with (tmp_path / "out/results/tune/trials.csv").open() as f:
        trials = list(csv.DictReader(f))
    assert len(trials) == 1 and trials[0]["status"] == "TERMINATED" and int(trials[0]["epochs"]) == 2
    assert best["trial_id"] == trials[0]["trial_id"] and 0.0 < best["value"] <= 1.0

    results = [json.loads(line) for path in tmp_path.rglob("result.json")
               for line in path.read_text().splitlines() if line.strip()]
    assert [r["epoch"] for r in results] == [0, 1] and all(0.0 < r["val/acc"] <= 1.0 for r in results)
    # Both ranks trained, each on its half of the training set (rank 0 wrote the outputs).
    indices = [p for p in tmp_path.rglob("indices.npz") if "ranks" not in p.parts and "out" not in p.parts]
    assert len(indices) == 1
    n_train, batch_size = len(np.load(indices[0])["train"]), cfg.data.batch_size
    per_rank = [math.ceil(len(range(rank, n_train, 2)) / batch_size) for rank in (0, 1)]
    assert max(per_rank) < math.ceil(n_train / batch_size)
    for result in results:
        ranks = json.loads(result["ranks"])
        assert sorted(r["rank"] for r in ranks) == [0, 1] and {r["world_size"] for r in ranks} == {2}
        assert [r["train_batches"] for r in ranks] == per_rank

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnn-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(children[0].info.run_id, "val/acc"))
    assert steps == [0, 1]


@pytest.mark.integration
@pytest.mark.slow
def test_ddp_trial_that_crashes_resumes_from_its_checkpoint(local_ray, cfg_factory, tmp_path: Path):
    """One rank raises after epoch 1 was reported: Ray Train ends the group, Tune retries the
    trial (tune.max_failures=1) from the epoch-1 checkpoint, and both ranks finish epoch 2."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sweeps)  # the workers cannot import tests/
    cfg = cfg_factory([*DDP, "tune.max_epochs=3", "tune.max_failures=1"])
    ensure_data(cfg)
    run_sweep(cfg, trial_callbacks=[sweeps.Crash(1, marker=str(tmp_path / "crashed"))])

    assert (tmp_path / "crashed").exists()
    with (tmp_path / "out/results/tune/trials.csv").open() as f:
        (trial,) = list(csv.DictReader(f))
    assert trial["status"] == "TERMINATED" and trial["failures"] == "1" and trial["epochs"] == "3"
    results = [json.loads(line) for path in tmp_path.rglob("result.json")
               for line in path.read_text().splitlines() if line.strip()]
    # Epochs 0 and 1 before the crash, then epoch 2 from the checkpoint, with both ranks.
    assert [r["epoch"] for r in results] == [0, 1, 2]
    assert all(sorted(r["rank"] for r in json.loads(result["ranks"])) == [0, 1] for result in results)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnn-pipeline").experiment_id])
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED" and child.data.tags["restarts"] == "1"
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "val/acc")) == [0, 1, 2]


@pytest.mark.integration
@pytest.mark.slow
def test_ddp_trial_that_diverges_stops_on_every_rank_and_is_never_best(local_ray, cfg_factory, tmp_path: Path):
    cfg = cfg_factory([*DDP, "optimizer=sgd", "tune.max_epochs=3",
                       "~tune.space", '+tune.space={optimizer.lr: "grid[1e6]"}'])
    ensure_data(cfg)
    with pytest.raises(PipelineError, match="no trial .* produced a finite val/acc"):
        run_sweep(cfg)  # its only trial diverged: there is no best to write

    with (tmp_path / "out/results/tune/trials.csv").open() as f:
        (trial,) = list(csv.DictReader(f))
    assert trial["status"] == "TERMINATED" and trial["diverged"] == "1" and trial["stop_reason"] == "diverged"
    assert int(trial["epochs"]) < 3 and math.isnan(float(trial["best_val_acc"]))
    assert not (tmp_path / "out/results/tune/best.yaml").exists()
