"""Runs whose process is gone: marking them KILLED from the next command on the store.

A run ends itself FINISHED, FAILED or KILLED on the way out (`TrackedRun.__exit__`), but a
process killed by SIGKILL (the OOM killer, a preempted machine, `kill -9`, a scheduler's
hard limit) has no way out, and its run would stay RUNNING forever, looking alive to anyone
browsing the store. So every run records which process writes it (host, pid, and the
process's start as the kernel counts it, so that a reused pid is not mistaken for the
writer), and every command that opens a run first ends the runs of this machine whose
writer is gone: status KILLED, end time now, tag `pipeline.ended=process gone`.

Only runs written on this machine (same host name and the same pid namespace, so two
containers sharing a host name judge only their own) are judged; a run of another machine
is never touched, whatever its state.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

HOST_TAG = "pipeline.host"
PID_TAG = "pipeline.pid"
# "<boot id>/<pid namespace>/<start in clock ticks since boot>", where the system tells (Linux).
PROCESS_TAG = "pipeline.process"
ENDED_TAG = "pipeline.ended"
GONE = "process gone"

_reaped: set[str] = set()  # stores this process has already swept: once per process is enough


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _started(pid: int) -> str | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:
        return stat.rpartition(")")[2].split()[19]  # after the name, which may hold spaces
    except IndexError:
        return None


def _boot_and_namespace() -> tuple[str, str] | None:
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return (boot, namespace) if boot else None


def process_tags(pid: int | None = None) -> dict[str, str]:
    """The tags naming the process that writes a run (this one by default)."""
    pid = os.getpid() if pid is None else pid
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid)}
    where, started = _boot_and_namespace(), _started(pid)
    if where and started:
        tags[PROCESS_TAG] = f"{where[0]}/{where[1]}/{started}"
    return tags


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def writer_gone(tags: dict[str, str], *, start_time_ms: int | None = None) -> bool | None:
    """True if the process these run tags name is gone, False if it runs, None if this
    machine cannot tell (another host or container, or tags that name no process)."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return None
    pid = int(tags[PID_TAG])
    recorded, here = tags.get(PROCESS_TAG), _boot_and_namespace()
    if recorded is None or here is None:  # no /proc: the pid is all there is to go by
        return not _pid_running(pid)
    boot, _, rest = recorded.partition("/")
    namespace, _, started = rest.rpartition("/")
    if namespace != here[1]:
        return None  # another container with our host name: its pids are not ours to look up
    if boot != here[0]:
        # Another boot: this machine rebooted since, unless another machine has our name. A run
        # begun before this boot cannot still be written from here.
        uptime = _read("/proc/uptime")
        booted_ms = (time.time() - float(uptime.split()[0])) * 1000 if uptime else None
        return None if booted_ms is None or start_time_ms is None else start_time_ms < booted_ms
    return _started(pid) != started  # gone, or the pid now belongs to a newer process


def _pages(search: Callable[..., Any], **kwargs: Any) -> list[Any]:
    """Every result of an MLflow search, page by page."""
    found, token = [], None
    while True:
        page = search(**kwargs, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def reap_gone_runs(client: MlflowClient) -> list[str]:
    """End KILLED every RUNNING run of the store whose writer on this machine is gone; their
    ids. Once per store and process, and never fatal: the store may refuse (another user's
    run on a server with permissions), which leaves that run as it was."""
    from mlflow.entities import RunTag, ViewType
    from mlflow.exceptions import MlflowException

    uri = str(client.tracking_uri)
    if uri in _reaped:
        return []
    _reaped.add(uri)
    host = socket.gethostname()
    ended: list[str] = []
    try:
        experiments = [e.experiment_id for e in _pages(client.search_experiments, view_type=ViewType.ACTIVE_ONLY)]
        quoted = host.replace("'", "\\'")
        runs = _pages(client.search_runs, experiment_ids=experiments, run_view_type=ViewType.ACTIVE_ONLY,
                      filter_string=f"attributes.status = 'RUNNING' and tags.\"{HOST_TAG}\" = '{quoted}'",
                      ) if experiments else []
    except MlflowException as err:
        log.warning("could not look for runs left RUNNING by a killed process in %s: %s", uri, err.message)
        return []
    for run in runs:
        if not writer_gone(run.data.tags, start_time_ms=run.info.start_time):
            continue
        try:
            client.log_batch(run.info.run_id, tags=[RunTag(ENDED_TAG, GONE)])
            client.set_terminated(run.info.run_id, status="KILLED", end_time=int(time.time() * 1000))
        except MlflowException as err:
            log.warning("run %s was left RUNNING by process %s, which is gone, but could not be marked: %s",
                        run.info.run_id, run.data.tags.get(PID_TAG), err.message)
            continue
        log.warning("run %s was left RUNNING by process %s on %s, which is gone (killed?): marked KILLED",
                    run.info.run_id, run.data.tags.get(PID_TAG), host)
        ended.append(run.info.run_id)
    return ended
