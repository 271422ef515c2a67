"""The local worker pool behind parallel folds (`pipeline.tasks.fold_pool`): results as tasks
end, errors and dead workers reported per task, the workers' environment, and stopping them."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest

from pipeline.tasks.fold_pool import ProcessPool, RemoteError, WorkerLost, worker_env

# The functions below run in the workers: spawned processes import them from this module
# (they get this process's sys.path, tests/ included).


def _mark_setup() -> None:
    os.environ["POOL_TEST_SETUP"] = str(os.getpid())


def _whoami(delay: float) -> dict:
    time.sleep(delay)
    return {"pid": os.getpid(), "setup": os.environ.get("POOL_TEST_SETUP"),
            **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES")}}


def _fail() -> None:
    raise ValueError("a fold's own error")


def _broken_setup() -> None:
    raise ImportError("a worker's set-up failed")


def _sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not reaped) is gone for our purposes.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] != "Z"


def test_tasks_run_in_set_up_workers_with_a_ray_tasks_environment():
    with ProcessPool(2, setup=_mark_setup, env=worker_env(1)) as pool:
        pids = set(pool.pids)
        # The longer task goes first: results come back as tasks end, not in queue order.
        results = list(pool.run([("slow", _whoami, (1.5,)), ("fast", _whoami, (0.0,)), ("then", _whoami, (0.0,))]))
    assert [key for key, _ in results][-1] == "slow"
    assert {key for key, _ in results} == {"slow", "fast", "then"}
    for _, got in results:
        assert got["pid"] in pids and got["setup"] == str(got["pid"])  # setup ran in that worker
        assert (got["OMP_NUM_THREADS"], got["OMP_WAIT_POLICY"], got["CUDA_VISIBLE_DEVICES"]) == ("1", "PASSIVE", "")
    assert pids == {r["pid"] for _, r in results}  # both workers took tasks
    assert not any(_alive(pid) for pid in pids)  # closed: the workers exited


def test_a_task_error_comes_back_with_its_traceback_and_the_worker_goes_on():
    with ProcessPool(1, env=worker_env(1)) as pool:
        results = dict(pool.run([("bad", _fail, ()), ("good", _sleep, (0,))]))
    assert isinstance(results["bad"], RemoteError)
    assert "ValueError: a fold's own error" in str(results["bad"]) and "_fail" in str(results["bad"])
    assert isinstance(results["good"], int)


def test_a_killed_worker_fails_its_task_only_and_is_replaced():
    with ProcessPool(2, env=worker_env(1)) as pool:
        victim = pool.pids[0]
        threading.Timer(2.0, os.kill, (victim, signal.SIGKILL)).start()
        results = dict(pool.run([("killed", _sleep, (30,)), ("other", _sleep, (3,)), ("after", _sleep, (0,))]))
        assert isinstance(results["killed"], WorkerLost)
        assert f"worker process {victim} died (signal SIGKILL)" in str(results["killed"])
        assert results["other"] != victim and isinstance(results["after"], int)
        assert victim not in pool.pids and len(pool.pids) == 2
        # The replacement takes tasks like the others.
        assert isinstance(dict(pool.run([("next", _sleep, (0,))]))["next"], int)


def test_leaving_on_an_exception_stops_busy_workers_at_once():
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt), ProcessPool(2, env=worker_env(1)) as pool:
        pids = pool.pids
        # From another thread, as a signal may land in any of the driver's threads.
        threading.Timer(1.0, signal.raise_signal, (signal.SIGINT,)).start()
        list(pool.run([(i, _sleep, (60,)) for i in range(2)]))
    assert time.monotonic() - start < 20
    assert not any(_alive(pid) for pid in pids)
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]


def test_workers_ignore_sigint_which_the_driver_handles():
    """A Ctrl+C reaches the whole process group: the workers leave it to the driver."""
    with ProcessPool(1, env=worker_env(1)) as pool:
        threading.Timer(1.0, os.kill, (pool.pids[0], signal.SIGINT)).start()
        [(_, pid)] = list(pool.run([("task", _sleep, (2.5,))]))
    assert isinstance(pid, int)


def test_workers_whose_set_up_fails_fail_each_task_instead_of_hanging():
    with ProcessPool(2, setup=_broken_setup, env=worker_env(1)) as pool:
        results = dict(pool.run([(i, _sleep, (0,)) for i in range(3)]))
    assert sorted(results) == [0, 1, 2]
    assert all(isinstance(r, WorkerLost) and "exit status 1" in str(r) for r in results.values()), results
