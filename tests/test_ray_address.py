"""`tune.address: null` starts a private Ray, never another process's: not the one RAY_ADDRESS
names (what plain `ray.init()` would join), while `tune.address=auto` does join it.

The other Ray is a real one, started by a second Python process with token authentication
on (Ray's default for a new local Ray), and stopped by that process's own `ray.shutdown()`
when the test closes its stdin. Once this process has started a Ray itself, it holds the
same token and a join succeeds (`auto` shows it does), so joining would not go unnoticed.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import sweeps
from pipeline.tasks.data import ensure_data
from pipeline.tasks.tune import tune
from pipeline.tuning.ray_init import init_ray

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OTHER_RAY = """
import sys
import ray

ray.init(address="local", num_cpus=1, include_dashboard=False)
context = ray.get_runtime_context()
print(context.gcs_address, context.get_node_id(), flush=True)
sys.stdin.read()  # until the test closes stdin
ray.shutdown()
"""
START_TIMEOUT_S = 120


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def other_ray(tmp_path_factory: pytest.TempPathFactory):
    """{address, node_id} of a 1-CPU Ray owned by another process."""
    log_path = tmp_path_factory.mktemp("other-ray") / "log.txt"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", OTHER_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, text=True, start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""
        if not line:
            pytest.fail(f"the other Ray did not start:\n{log_path.read_text()[-3000:]}")
        address, node_id = line.split()
        yield {"address": address, "node_id": node_id}
    finally:
        proc.stdin.close()  # its ray.shutdown() stops the Ray it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this fixture started, nothing else
            proc.wait(timeout=10)


@pytest.fixture
def ray_address(other_ray, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """RAY_ADDRESS names the other Ray."""
    _shutdown_ray()
    monkeypatch.setenv("RAY_ADDRESS", other_ray["address"])
    yield other_ray
    _shutdown_ray()


def test_null_address_starts_its_own_ray_and_auto_joins(ray_address, capsys):
    import ray

    assert init_ray({"address": None, "num_cpus": 1})
    context = ray.get_runtime_context()
    own = context.get_node_id()
    assert own != ray_address["node_id"]
    assert context.gcs_address != ray_address["address"]
    assert ray.cluster_resources()["CPU"] == 1
    assert "ignores RAY_ADDRESS" in capsys.readouterr().out
    # In-process, a Ray already connected is used as it is (the conftest's `local_ray`).
    assert not init_ray({"address": None})
    assert ray.get_runtime_context().get_node_id() == own
    ray.shutdown()

    assert init_ray({"address": "auto"})
    assert ray.get_runtime_context().get_node_id() == ray_address["node_id"]  # auto follows RAY_ADDRESS


def test_sweep_with_null_address_never_runs_on_another_ray(ray_address, cfg_factory, tmp_path: Path):
    import ray

    cfg = cfg_factory(["model=mlp", "tune.scheduler=fifo", "tune.num_samples=1", "tune.max_epochs=1",
                       "tune.num_cpus=1", *sweeps.space(**{"optimizer.lr": "loguniform(1e-3, 1e-1)"})])
    ensure_data(cfg)
    tune(cfg)
    assert not ray.is_initialized()  # the sweep shut down the Ray it started
    _, _, children = sweeps.tree(tmp_path)
    assert len(children) == 1
    assert children[0].data.tags["node_id"] not in ("", ray_address["node_id"])
