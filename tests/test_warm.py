"""Warm stages (`PIPELINE_WARM=1`, `pipeline.cli.warm`): a stage runs in a child forked from a
server that has imported torch, Lightning, MLflow and Ray, and behaves as in its own process:
the same outputs, exit statuses and signals; a client killed takes its stage with it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import make_cfg
from pipeline.cli import warm
from pipeline.tasks.data import ensure_data
from procs import project_env, start_stage, wait_until


def _warm(proc: psutil.Process | None) -> bool:
    return proc is not None and "pipeline.cli.warm" in " ".join(proc.cmdline())


def _servers(folder: Path, *, below: bool = False) -> list[psutil.Process]:
    """The warm servers started from `folder` (a server's working directory is its first
    client's), or from any folder below it; not the stages they forked."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            cwd = Path(proc.cwd())
            if _warm(proc) and (cwd == folder or below and folder in cwd.parents) and not _warm(proc.parent()):
                found.append(proc)
    return found


@pytest.fixture
def warm_env(tmp_path: Path):
    """PIPELINE_WARM=1 with a folder of servers of this test's own (TMPDIR); the servers it
    started are stopped at the end."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    yield {"PIPELINE_WARM": "1", "TMPDIR": str(tmp)}
    for server in _servers(tmp_path, below=True):
        with contextlib.suppress(psutil.Error):
            server.kill()


def _run(stage: str, cfg, folder: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    log = folder / f"{stage}.log"
    with log.open("w") as out:
        proc = start_stage(stage, cfg, folder, out, env)
        proc.wait(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text())


def test_a_warm_stage_writes_and_prints_what_a_cold_one_does(tmp_path: Path, warm_env):
    """The same train stage cold and warm: the same metrics file, summary and exit status; then a
    bad value fails warm as it fails cold (status 2, the same message), in the same server."""
    results = {}
    for mode in ("cold", "warm"):
        folder = tmp_path / mode
        folder.mkdir()
        cfg = make_cfg(folder, ["model=mlp", "trainer.deterministic=true"], epochs=2)
        ensure_data(cfg)
        done = _run("train", cfg, folder, warm_env if mode == "warm" else None)
        assert done.returncode == 0, done.stdout[-3000:]
        metrics = {k: v for k, v in json.loads((folder / "out" / "metrics" / "train.json").read_text()).items()
                   if not k.startswith("time_")}  # the seconds it took differ
        summary = [line for line in done.stdout.splitlines() if line.startswith("val/")]
        results[mode] = metrics, summary
    assert results["warm"] == results["cold"]
    assert results["cold"][1], "the train summary's metrics line"
    [server] = _servers(tmp_path / "warm")
    assert not _servers(tmp_path / "cold")

    bad = {}
    for mode in ("cold", "warm"):
        cfg = make_cfg(tmp_path / mode, ["model=mlp", "optimizer.lr=-1"])
        done = _run("train", cfg, tmp_path / mode, warm_env if mode == "warm" else None)
        assert done.returncode == 2, done.stdout[-3000:]
        bad[mode] = done.stdout.replace(str(tmp_path / mode), "<folder>")
    assert bad["warm"] == bad["cold"]
    assert "optimizer.lr" in bad["warm"] and "Traceback" not in bad["warm"]
    assert _servers(tmp_path / "warm") == [server]  # it served both


@pytest.mark.parametrize("sig, status, run_status", [(signal.SIGINT, 130, "KILLED"), (signal.SIGTERM, 143, "KILLED"),
                                                     (signal.SIGKILL, -signal.SIGKILL, "RUNNING")],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_signal_to_the_client_ends_its_warm_stage_as_it_would_a_cold_one(tmp_path: Path, warm_env, sig, status,
                                                                            run_status):
    """The stage trains in the server's child, not in the process DVC started (which has no
    child); a signal to that process reaches the stage, which ends its MLflow run KILLED, and
    the process exits with the stage's status. SIGKILL cannot be passed on: the server, seeing
    the connection close, kills the stage (and whatever it started) rather than let it write
    on, and the run stays RUNNING as a cold stage's would. The server lives on either way."""
    cfg = make_cfg(tmp_path, ["model=mlp", "regularizer.early_stopping.enabled=false"], epochs=500)
    ensure_data(cfg)
    log = tmp_path / "stage.log"
    with log.open("w") as out:
        proc = start_stage("train", cfg, tmp_path, out, warm_env)
        try:
            wait_until(lambda: (tmp_path / "out" / "models" / "last.ckpt").exists(), proc, log)  # an epoch
            [server] = _servers(tmp_path)
            assert psutil.Process(proc.pid).children() == [server]  # it started the server, trains nothing
            [stage] = server.children()
            assert stage.cwd() == str(tmp_path)
            proc.send_signal(sig)
            assert proc.wait(timeout=120) == status, log.read_text()[-3000:]
        finally:
            proc.kill()
    _, alive = psutil.wait_procs([stage], timeout=10)  # (the server reaps it: no status to read here)
    assert not alive
    assert server.is_running()
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as con:
        assert [s for (s,) in con.execute("SELECT status FROM runs")] == [run_status]


def test_an_idle_server_exits_and_a_stage_without_one_runs_in_its_own_process(tmp_path: Path, warm_env):
    """A server with nothing to do exits after PIPELINE_WARM_IDLE_S and removes its socket; a
    stage that finds no usable folder for servers (not this user's alone) runs itself."""
    cfg = make_cfg(tmp_path, ["model=mlp", "optimizer.lr=-1"])
    done = _run("train", cfg, tmp_path, {**warm_env, "PIPELINE_WARM_IDLE_S": "8"})
    assert done.returncode == 2, done.stdout[-3000:]
    [server] = _servers(tmp_path)
    server.wait(timeout=30)
    folder = Path(warm_env["TMPDIR"]) / f"pipeline-warm-{os.getuid()}"
    assert not list(folder.iterdir())  # its socket, lock and (empty) log

    # `start` ahead of DVC (make run), then `stop` while it still imports.
    def warm_cli(command: str) -> int:
        return subprocess.run([sys.executable, "-m", "pipeline.cli.warm", command], cwd=tmp_path,
                              env={**project_env(), **warm_env}).returncode

    assert warm_cli("start") == 0
    deadline = time.monotonic() + 30
    while not any(lock.read_text() for lock in folder.glob("*.lock")):  # it starts in the background
        assert time.monotonic() < deadline
        time.sleep(0.1)
    [server] = _servers(tmp_path)
    assert warm_cli("stop") == 0
    server.wait(timeout=30)
    assert not list(folder.iterdir())
    assert warm_cli("stop") == 1  # none left

    folder.chmod(0o755)  # others could reach a socket there: no server is started nor used
    done = _run("train", cfg, tmp_path, warm_env)
    assert done.returncode == 2, done.stdout[-3000:]
    assert "optimizer.lr" in done.stdout
    assert not _servers(tmp_path)


def test_the_key_follows_the_python_the_import_path_the_code_and_load_time_settings(monkeypatch):
    """A server serves only clients of its own code and settings: another import path, a
    setting the libraries read as they load, or a changed file of the package is another key
    (the file's time is put back after)."""
    key = warm.key()
    assert warm.key() == key
    monkeypatch.setattr(sys, "path", [*sys.path, "/elsewhere"])
    assert warm.key() != key
    monkeypatch.undo()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # read when torch loads: another server
    assert warm.key() != key
    monkeypatch.undo()
    monkeypatch.setenv("DVC_STAGE", "train")  # differs every stage: the same server
    assert warm.key() == key
    monkeypatch.undo()
    source = Path(warm.__file__)
    before = source.stat()
    try:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        assert warm.key() != key
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert warm.key() == key


def test_a_warm_stages_fold_workers_are_forked_by_the_server_and_agree_with_spawned_ones(tmp_path: Path, warm_env):
    """Parallel folds in a warm cv stage: the pool's workers come from the server (its
    children beside the stage, with their imports done), and cv.json is the cold stage's."""
    results = {}
    for mode in ("cold", "warm"):
        folder = tmp_path / mode
        folder.mkdir()
        cfg = make_cfg(folder, ["model=mlp", "data.split.folds=3", "cv.parallel=true"], epochs=2)
        ensure_data(cfg)
        log = folder / "cv.log"
        most = 0  # the most processes the server had at once
        with log.open("w") as out:
            proc = start_stage("cv", cfg, folder, out, warm_env if mode == "warm" else None)
            while proc.poll() is None:
                with contextlib.suppress(psutil.Error, ValueError):
                    [server] = _servers(folder)
                    most = max(most, len(server.children()))
                time.sleep(0.1)
        assert proc.returncode == 0, log.read_text()[-3000:]
        results[mode] = json.loads((folder / "out" / "metrics" / "cv.json").read_text()), most
    assert results["warm"][0] == results["cold"][0]
    assert results["cold"][1] == 0
    assert results["warm"][1] == 3  # the stage and its two workers


def test_a_stopped_warm_cv_stage_ends_its_forked_workers(tmp_path: Path, warm_env):
    """SIGTERM to a warm cv stage's client while its forked workers train: the stage stops
    them (they are not its children: it signals them by pid), exits 143 and ends its run KILLED."""
    cfg = make_cfg(tmp_path, ["model=mlp", "data.split.folds=3", "cv.parallel=true",
                              "regularizer.early_stopping.enabled=false"], epochs=500)
    ensure_data(cfg)
    log = tmp_path / "stage.log"
    with log.open("w") as out:
        proc = start_stage("cv", cfg, tmp_path, out, warm_env)
        try:
            wait_until(lambda: any((tmp_path / "out" / "cv").glob("fold_*/models/last.ckpt")), proc, log)
            [server] = _servers(tmp_path)
            forked = server.children()
            assert len(forked) == 3  # the stage and its two workers
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
        finally:
            proc.kill()
    _, alive = psutil.wait_procs(forked, timeout=10)
    assert not alive
    assert server.is_running()
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as con:
        assert [s for (s,) in con.execute("SELECT status FROM runs")] == ["KILLED"]


def test_a_temporary_folder_too_deep_for_a_socket_means_cold_stages(tmp_path: Path, monkeypatch, caplog):
    """A Unix socket's path has at most 103 bytes (macOS; 107 on Linux): under a deeper TMPDIR
    no server is started and the stage runs in its own process, saying why."""
    deep = tmp_path / ("x" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    warm.start_server()
    assert warm.delegate(["report"]) is None
    assert "set TMPDIR to a shorter folder" in caplog.text
    assert not list((deep / f"pipeline-warm-{os.getuid()}").iterdir())
