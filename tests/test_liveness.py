"""Which RUNNING runs the next command may end: only this machine's, and only when their
process is gone (a reused pid included). Real processes, a real SQLite store."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from pipeline.tracking.liveness import ENDED_TAG, GONE, HOST_TAG, PID_TAG, PROCESS_TAG, process_tags
from pipeline.tracking.mlflow_run import TrackedRun, get_experiment_id


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.integration
def test_the_next_run_ends_only_this_machines_runs_whose_process_is_gone(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = get_experiment_id(client, "faults", None)
    other = get_experiment_id(client, "elsewhere", None)  # any experiment of the store is swept
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        alive = process_tags(sleeper.pid)
        dead = process_tags(_dead_pid())
        # A pid now held by a newer process than the run's: the same pid, another start.
        reused = {**alive, PROCESS_TAG: alive[PROCESS_TAG].rpartition("/")[0] + "/1"}
        cases = {
            "alive": (experiment, alive),
            "dead": (other, dead),
            "reused": (experiment, reused),
            "other host, dead pid": (experiment, {**dead, HOST_TAG: "another-machine"}),
            "other container, dead pid": (experiment, {**dead, PROCESS_TAG: "boot/pid:[1]/1"}),
            "no process tags": (experiment, {}),
        }
        ids = {name: client.create_run(exp, tags=tags).info.run_id for name, (exp, tags) in cases.items()}
        run = TrackedRun.start(tracking_uri=uri, experiment="faults")
        run.finish()
        ended = {name for name, rid in ids.items() if client.get_run(rid).info.status != "RUNNING"}
        assert ended == {"dead", "reused"}
        for name in ended:
            info = client.get_run(ids[name])
            assert info.info.status == "KILLED" and info.data.tags[ENDED_TAG] == GONE and info.info.end_time
        mine = client.get_run(run.run_id).data.tags
        assert mine[HOST_TAG] == socket.gethostname() and mine[PID_TAG] == str(os.getpid())

        # A run reopened by another process (evaluate after train) is this one's now.
        reopened = TrackedRun.resume(tracking_uri=uri, run_id=ids["dead"])
        assert client.get_run(ids["dead"]).data.tags[PID_TAG] == mine[PID_TAG]
        reopened.finish()
    finally:
        sleeper.kill()
        sleeper.wait()
