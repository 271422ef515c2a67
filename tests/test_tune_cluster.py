"""Ray Tune sweeps on more than one CPU box, simulated on one machine: logical GPUs shared by
fractional trials (`tune.resources.gpu=0.5`), and a multi-node cluster (`ray.cluster_utils.Cluster`)
joined through `tune.address`, including a worker node lost mid-sweep.

Trials are the MLP on digits for a few epochs; MLflow child runs give each trial's start and
end time, node id and GPU ids.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

import sweeps
from pipeline.tasks.data import ensure_data
from pipeline.tasks.tune import tune
from pipeline.training.metrics import EPOCH_METRICS
from pipeline.tuning.ray_init import TRIAL_ENV
from pipeline.tuning.trial import trial_accelerator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MLP = ["model=mlp", "tune.scheduler=fifo", *sweeps.space(**{"optimizer.lr": "loguniform(1e-3, 1e-1)"})]
MB = 1024**2


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


class RecordDevice(Callback):
    """Writes, per trial, the accelerator Lightning trains on and the GPUs Ray assigned."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer, pl_module) -> None:
        import os

        import ray
        from ray import tune

        record = {"accelerator": type(trainer.accelerator).__name__, "device": str(pl_module.device),
                  "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                  "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        trial_id = tune.get_context().get_trial_id()
        (Path(self.folder) / f"{trial_id}.json").write_text(json.dumps(record))


# ---------------------------------------------------------------------------- logical GPUs

def test_trial_accelerator_follows_assigned_gpus():
    assert trial_accelerator([0], cuda_available=True) == ("gpu", 1)
    assert trial_accelerator(["2"], cuda_available=True) == ("gpu", 1)
    assert trial_accelerator([0], cuda_available=False)[0] == "cpu"   # logical GPUs, no CUDA
    assert trial_accelerator([], cuda_available=True)[0] == "cpu"     # no GPU for this trial


@pytest.fixture
def gpu_ray():
    """A local Ray with 4 logical GPUs (no CUDA needed) and 2 CPUs."""
    import ray

    _shutdown_ray()
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, object_store_memory=200 * MB,
             runtime_env={"env_vars": TRIAL_ENV})
    yield
    ray.shutdown()


def test_fractional_gpus_cap_concurrency_and_ids(gpu_ray, cfg_factory, tmp_path: Path, capfd):
    """Eight trials share four logical GPUs, up to eight at once: also the single MLflow writer's
    test (with SQLite, no "database is locked" and no metric lost)."""
    import torch
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    devices = tmp_path / "devices"
    devices.mkdir()
    cfg = cfg_factory([*MLP, "tune.num_samples=8", "tune.max_epochs=2", "tune.resources.gpu=0.5",
                       "tune.resources.cpu=0.25", "tune.max_concurrent_trials=null"])
    ensure_data(cfg)
    tune(cfg, trial_callbacks=[RecordDevice(str(devices))])

    trials = sweeps.trials(tmp_path)
    assert len(trials) == 8 and {t["status"] for t in trials} == {"TERMINATED"}
    client, parent, children = sweeps.tree(tmp_path)
    assert len(children) == 8 and all(c.info.status == "FINISHED" for c in children)
    output = capfd.readouterr()
    assert "database is locked" not in output.out + output.err
    for child in children:  # every epoch of every metric of every trial reached the store
        for key in EPOCH_METRICS:
            assert sweeps.steps(client, child.info.run_id, key) == [0, 1], (key, child.data.tags["trial_id"])

    intervals = [(c.info.start_time, c.info.end_time) for c in children]
    peak = sweeps.max_overlap(intervals)
    assert 4 <= peak <= 8, peak  # 4 GPUs / 0.5 GPU a trial; 0.25 CPU each lets all 8 start at once
    by_gpu: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for child in children:
        ids = child.data.tags["gpu_ids"]
        assert ids in {"0", "1", "2", "3"}, ids  # exactly one valid logical GPU per trial
        by_gpu[ids].append((child.info.start_time, child.info.end_time))
    for gpu, spans in by_gpu.items():
        assert sweeps.max_overlap(spans) <= 2, (gpu, spans)  # 0.5 GPU each: two trials share a GPU

    # Every trial saw the GPU Ray gave it; without CUDA it trains on the CPU, not crashing.
    records = {p.stem: json.loads(p.read_text()) for p in devices.glob("*.json")}
    assert set(records) == {t["trial_id"] for t in trials}
    tags = {c.data.tags["trial_id"]: c.data.tags["gpu_ids"] for c in children}
    for trial_id, record in records.items():
        assert record["gpu_ids"] == [tags[trial_id]]
        expected = "CUDAAccelerator" if torch.cuda.is_available() else "CPUAccelerator"
        assert record["accelerator"] == expected, record


# ---------------------------------------------------------------------------- a multi-node cluster

@pytest.fixture
def cluster():
    """A head without CPUs (trials run on workers only) and two 1-CPU worker nodes. The test
    process stays disconnected: `tune` joins through `tune.address` and leaves again."""
    from ray.cluster_utils import Cluster

    _shutdown_ray()
    node = {"object_store_memory": 100 * MB}
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 0, "include_dashboard": False, **node})
    c.add_node(num_cpus=1, **node)
    c.add_node(num_cpus=1, **node)
    yield c
    _shutdown_ray()
    c.shutdown()


def _cluster_cfg(cfg_factory, cluster, tmp_path: Path, overrides: list[str]):
    return cfg_factory([*MLP, f"tune.address={cluster.address}", f"tune.storage_path={tmp_path / 'shared'}",
                        "tune.max_concurrent_trials=2", *overrides])


def test_trials_spread_over_worker_nodes(cluster, cfg_factory, tmp_path: Path):
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sweeps)  # the workers cannot import tests/
    cfg = _cluster_cfg(cfg_factory, cluster, tmp_path, ["tune.num_samples=6", "tune.max_epochs=2"])
    ensure_data(cfg)
    started = tmp_path / "started"
    started.mkdir()
    tune(cfg, trial_callbacks=[sweeps.WaitForTwoTrials(str(started))])
    assert not ray.is_initialized()  # tune joined the cluster itself, and left it

    trials = sweeps.trials(tmp_path)
    assert len(trials) == 6 and {t["status"] for t in trials} == {"TERMINATED"}
    assert any((tmp_path / "shared").glob("*/experiment_state-*.json"))  # the shared storage
    _, _, children = sweeps.tree(tmp_path)
    assert all(c.info.status == "FINISHED" for c in children)
    workers = {n.node_id for n in cluster.worker_nodes}
    used = {c.data.tags["node_id"] for c in children}
    assert used == workers, (used, workers, cluster.head_node.node_id)  # both workers, never the head


def _reported_epochs(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM metrics WHERE key = 'val/acc'").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.fault("3. Sweep: node lost", fault="a worker node of a 2-worker Ray cluster removed after the first "
                   "epoch is logged (tune.max_failures=2)",
                   expected="its trial retried on the survivor from its checkpoint; every trial TERMINATED with "
                            "all epochs, one FINISHED run each")
def test_sweep_survives_losing_a_worker_node(cluster, cfg_factory, tmp_path: Path, observe):
    cfg = _cluster_cfg(cfg_factory, cluster, tmp_path,
                       ["tune.num_samples=6", "tune.max_epochs=3", "tune.max_failures=2"])
    ensure_data(cfg)
    doomed = next(iter(cluster.worker_nodes))
    removed: list[float] = []

    def remove_after_first_results() -> None:
        deadline = time.monotonic() + 180
        while _reported_epochs(tmp_path / "mlflow.db") < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        cluster.remove_node(doomed)
        removed.append(time.time())

    thread = threading.Thread(target=remove_after_first_results, daemon=True)
    thread.start()
    tune(cfg)
    thread.join(timeout=30)
    assert removed, "the worker node was never removed"
    observe.saw("1 of 2 worker nodes removed mid-sweep")

    trials = sweeps.trials(tmp_path)
    client, _, children = sweeps.tree(tmp_path)
    sweeps.observe_retries(observe, client, trials, children, epochs=3)
    assert len(trials) == 6 and {t["status"] for t in trials} == {"TERMINATED"}, trials
    assert all(int(t["epochs"]) == 3 for t in trials)
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    survivor = next(n.node_id for n in cluster.worker_nodes)
    # Trials that started after the loss ran on the surviving node.
    late = [c for c in children if c.info.start_time / 1000 > removed[0] + 1]
    assert all(c.data.tags["node_id"] == survivor for c in late), [(c.data.tags, c.info.start_time) for c in late]
    # The trial running on the lost node was retried (from its checkpoint). Its node tag may
    # still name the lost node: it is set from the trial's first report.
    retried = [t for t in trials if int(t["failures"]) >= 1]
    assert retried, trials
    for trial in retried:
        child = next(c for c in children if c.data.tags["trial_id"] == trial["trial_id"])
        assert child.data.tags["restarts"] == trial["failures"]
