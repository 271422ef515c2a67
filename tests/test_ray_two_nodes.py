"""A real two-node Ray cluster on this machine, set up as the README's "Running on a Ray
cluster" says: `ray start --head`, then `ray start --address=<head ip>:<port>`, with Ray's
token authentication on (RAY_AUTH_MODE=token and the cluster's token on every node and on
the driver); a client without the token is refused.

A sweep through `tune.address` refuses the default local `tune.storage_path` on two nodes;
with one set, it runs one trial on each node while the project's data folder is gone (the
driver read it and hands it to the trials through Ray's object store), gets the results that
training on the data read from disk gets, and leaves the whole MLflow run tree.

Each node has its own ports and temp dir; the test stops exactly the processes it started
(each `ray start --block` leads the process group of its node's processes), never `ray stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import pipeline
import sweeps
from pipeline.tasks.data import ensure_data
from pipeline.tasks.train import train
from pipeline.training.metrics import EPOCH_METRICS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RAY = Path(sys.executable).parent / "ray"
TESTS = Path(__file__).resolve().parent
MB = 1024**2
START_TIMEOUT_S = 120
DRIVER_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str              # <head ip>:<port>, what tune.address takes
    env: dict[str, str]       # a process's environment on any node: the token, and token mode


def _start_node(args: list[str], env: dict[str, str], temp_dir: Path, log: Path) -> subprocess.Popen:
    """`ray start --block`: it stays in the foreground, and its node's processes in its group."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(RAY), "start", "--block", f"--temp-dir={temp_dir}", "--num-cpus=1", "--disable-usage-stats",
             f"--object-store-memory={100 * MB}", f"--dashboard-agent-listen-port={_free_port()}", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_node(proc)
            pytest.fail(f"`ray start {' '.join(args)}` did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return proc


def _stop_node(proc: subprocess.Popen) -> None:
    """SIGTERM makes `ray start --block` stop its node's processes; SIGKILL whatever is left
    of its process group (which holds only what it started), and wait for them to go."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[Cluster]:
    import ray

    # Any string serves as the token; `ray get-auth-token --generate` makes one like it.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # The nodes' workers import the `pipeline` this test imports.
    src = str(Path(pipeline.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    # Short temp dirs (not under tmp_path): Ray's socket paths in them must stay under 107 bytes.
    head_dir, worker_dir = Path(tempfile.mkdtemp(prefix="ray-head-")), Path(tempfile.mkdtemp(prefix="ray-worker-"))
    port = _free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start_node(["--head", f"--port={port}", "--include-dashboard=false",
                                  f"--dashboard-port={_free_port()}"], env, head_dir, tmp_path / "head.log"))
        procs.append(_start_node([f"--address={address}"], env, worker_dir, tmp_path / "worker.log"))
        yield Cluster(address=address, env=env)
    finally:
        for proc in reversed(procs):  # the worker first, while its head still answers
            _stop_node(proc)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)
    assert not [p.pid for p in procs if _group_alive(p.pid)], "a Ray node's processes outlived the test"


def test_sweep_on_two_nodes_with_token_auth_and_no_shared_data(two_nodes, cfg_factory, tmp_path: Path):
    # A machine without the token (nothing in the environment, no ~/.ray/auth_token) is refused.
    stranger_home = tmp_path / "stranger"
    stranger_home.mkdir()
    stranger_env = {k: v for k, v in two_nodes.env.items() if not k.startswith("RAY_AUTH")}
    stranger = subprocess.Popen([str(RAY), "status", f"--address={two_nodes.address}"],
                                env={**stranger_env, "HOME": str(stranger_home)}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        _sweep(two_nodes, cfg_factory, tmp_path)
        output, _ = stranger.communicate(timeout=120)
    finally:
        if stranger.poll() is None:
            stranger.kill()
            stranger.wait()
    assert stranger.returncode != 0 and "InvalidAuthToken" in output, output[-3000:]


def _sweep(two_nodes: Cluster, cfg_factory, tmp_path: Path) -> None:
    cfg = cfg_factory(["model=mlp", "tune.scheduler=fifo", "tune.search_alg=grid", "tune.max_epochs=2",
                       *sweeps.space(**{"optimizer.lr": "grid[0.01, 0.05]"}), "tune.max_concurrent_trials=2",
                       f"tune.address={two_nodes.address}", f"tune.storage_path={tmp_path / 'shared'}"])
    ensure_data(cfg)
    config, started, nodes = tmp_path / "sweep.yaml", tmp_path / "started", tmp_path / "nodes.json"
    OmegaConf.save(cfg, config, resolve=True)
    started.mkdir()
    # The driver is a process of its own, with the token and token mode in its environment
    # before it imports Ray, as a shell running `pipeline tune` gives them.
    driver = subprocess.run(
        [sys.executable, str(TESTS / "two_node_driver.py"), str(config), str(started), str(nodes)],
        env={**two_nodes.env, "PYTHONPATH": os.pathsep.join([two_nodes.env["PYTHONPATH"], str(TESTS)])},
        cwd=tmp_path, capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-6000:]
    assert "refused: Ray has 2 nodes but tune.storage_path is the local folder" in driver.stdout

    trials = sweeps.trials(tmp_path)
    assert len(trials) == 2 and {t["status"] for t in trials} == {"TERMINATED"}, trials
    client, parent, children = sweeps.tree(tmp_path)  # one parent, and nothing but its children
    assert parent.info.status == "FINISHED" and len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert sweeps.steps(client, child.info.run_id, key) == [0, 1], key
    cluster = json.loads(nodes.read_text())
    assert sorted(n["head"] for n in cluster) == [False, True]
    assert {c.data.tags["node_id"] for c in children} == {n["node_id"] for n in cluster}  # one trial a node

    # What each trial learned from the data it got through Ray is what training on the data
    # read from disk (back in its folder now) learns.
    folders = sorted((tmp_path / "shared").glob("*/*/models/config.yaml"))
    assert len(folders) == 2
    for path in folders:
        trial = path.parents[1]
        trial_cfg = OmegaConf.load(path)
        trial_cfg.paths.out_dir = str(tmp_path / "from-disk" / trial.name)
        train(trial_cfg)
        ours, theirs = (json.loads((Path(d) / "metrics" / "train.json").read_text())
                        for d in (trial_cfg.paths.out_dir, trial))
        ours.pop("time_train_s"), theirs.pop("time_train_s")
        assert ours == theirs, trial.name
