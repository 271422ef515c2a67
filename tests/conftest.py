"""Shared fixtures: the real composed config, shrunk for CPU tests, in a temporary project,
and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

import servers
from faults import Observed
from pipeline.config import compose

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("PYTHONHASHSEED", "0")
# Test models are tiny and tests start subprocesses (DVC stages, an MLflow server): one
# intra-op thread avoids OpenMP threads spin-waiting against each other on small machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)


def make_cfg(tmp: Path, overrides: Sequence[str] = (), *, epochs: int = 2, tracking: bool = True) -> DictConfig:
    """The real config with small limits, sequential folds, all paths inside `tmp` and a
    SQLite store there."""
    cfg = compose([
        f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
        # Folds one after another unless a test asks: a Ray per cross-validation costs seconds.
        "cv.parallel=false",
        f"tracking.enabled={str(tracking).lower()}", *overrides,
    ], conf=REPO / "conf")
    with open_dict(cfg):
        cfg.paths.root = str(tmp)
        cfg.paths.data_dir = str(tmp / "data")
        cfg.paths.download_dir = str(tmp / "downloads")
        cfg.paths.out_dir = str(tmp / "out")
        if not any(o.startswith("tracking.tracking_uri") for o in overrides):
            cfg.tracking.tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
            cfg.tracking.artifact_location = str(tmp / "mlartifacts")
    return cfg


@pytest.fixture
def cfg_factory(tmp_path: Path):
    """`cfg_factory(["model=lenet5"], epochs=3)` -> a shrunk config rooted in tmp_path."""
    return lambda overrides=(), **kw: make_cfg(tmp_path, overrides, **kw)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs) for a test module; its sweeps join it instead of starting their own."""
    import ray

    from pipeline.tuning.ray_init import init_ray

    init_ray({"num_cpus": 2})
    yield
    ray.shutdown()


@pytest.fixture
def observe(record_property) -> Observed:
    """A fault scenario's record of what it saw and lost (tests/faults.py)."""
    return Observed(record_property)


@pytest.fixture
def digits_cfg(cfg_factory) -> DictConfig:
    """A shrunk digits config whose data (fetch + split) is already prepared."""
    from pipeline.tasks.data import ensure_data

    cfg = cfg_factory()
    ensure_data(cfg)
    return cfg


# ---------------------------------------------------------------------------- a real MLflow server

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and proxied local artifacts
    (`servers.mlflow_server`): {url, artifacts, root}."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with servers.mlflow_server(root, f"sqlite:///{root / 'server.db'}") as server:
        yield {"url": server.url, "artifacts": server.artifacts, "root": root}
