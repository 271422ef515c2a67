"""Shared fixtures: the real composed config, shrunk for CPU tests, in a temporary project,
and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from pipeline.config import compose

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("PYTHONHASHSEED", "0")
# Test models are tiny and tests start subprocesses (DVC stages, an MLflow server): one
# intra-op thread avoids OpenMP threads spin-waiting against each other on small machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)


def make_cfg(tmp: Path, overrides: Sequence[str] = (), *, epochs: int = 2, tracking: bool = True) -> DictConfig:
    """The real config with small limits, all paths inside `tmp` and a SQLite store there."""
    cfg = compose([
        f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
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
def digits_cfg(cfg_factory) -> DictConfig:
    """A shrunk digits config whose data (fetch + split) is already prepared."""
    from pipeline.tasks.data import ensure_data

    cfg = cfg_factory()
    ensure_data(cfg)
    return cfg


# ---------------------------------------------------------------------------- a real MLflow server

SERVER_START_TIMEOUT_S = 120  # a cold `mlflow server` import + DB migration on a busy 2-CPU box


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and proxied local artifacts.

    The default security middleware of MLflow 3 accepts Host 127.0.0.1/localhost, so no
    `--allowed-hosts` is needed for a local client. `--workers 1` and no job runner keep it
    to two processes.
    """
    root = tmp_path_factory.mktemp("mlflow-server")
    artifacts = root / "server-artifacts"
    executable = Path(sys.executable).parent / "mlflow"
    assert executable.exists(), f"no mlflow script beside {sys.executable}"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("wb")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # MLflow >= 3.5 also starts a job runner with ~7 Huey worker processes (GenAI scorers,
    # trace archival); on 2 CPUs they starve training for tens of seconds. Tracking needs none.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    proc = subprocess.Popen(
        [str(executable), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(artifacts)],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n"
                            f"{(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S} s:\n"
                            f"{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.25)
        yield {"url": url, "artifacts": artifacts, "root": root}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
