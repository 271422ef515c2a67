"""Parallel folds on this machine without Ray: a few worker processes of our own.

Cross-validation and comparisons run their folds side by side (`cv.parallel`). On a cluster
(`tune.address`), or in a process already connected to Ray, they are Ray tasks. On this
machine alone they run here instead: a private Ray costs each cv or compare stage about 6 s to
start and stop (its raylet, GCS and API server; then 1 s waiting for its autoscaler monitor to
exit), and every Ray worker imports pydantic, starlette and pyarrow for its serialization
(1.9 CPU s each), none of which a local pool needs.

The workers start when the task knows it will need them, before it opens its MLflow runs: they
import the training code (about 8 s: torch and Lightning) while the driver still works, instead
of after it. They are spawned, not forked (the driver has imported torch, whose thread pools do
not survive a fork), with the environment a Ray task of `threads` CPUs gets: that many OpenMP
threads, and no GPU (`CUDA_VISIBLE_DEVICES` empty), so folds train alike on either path. They
ignore SIGINT: a Ctrl+C reaches the whole process group, and the driver stops them itself
(`terminate`), as it does on SIGTERM. A worker that dies (SIGKILL, out of memory) fails the task
it held, which the caller reports; a fresh worker takes its place for the tasks left. In a
warm stage (`PIPELINE_WARM=1`) the workers are forked by the warm server instead, whose
imports are done (`start_workers_with`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

STOP_TIMEOUT_S = 10  # for a worker to exit once told to (after that it is killed)
# How often the driver's wait for results wakes: a signal delivered to another of its threads
# does not interrupt the main thread's wait, so its handler (Ctrl+C, SIGTERM) runs only then.
POLL_S = 0.5


class WorkerLost(RuntimeError):
    """A worker process died while it held a task: its result is lost."""


class RemoteError(RuntimeError):
    """A task raised in its worker; the message holds the worker's traceback."""


# How a worker process starts: spawned by the pool, unless the entry layer set another way
# (`pipeline.cli.warm` forks workers from its server, whose imports are done). Called as
# `start(target, conn, args)` for a process that runs `target(conn, *args)`; it returns the
# started process (what the pool uses of `multiprocessing.Process`: pid, sentinel, is_alive,
# join, exitcode, terminate, kill), or None to have the pool spawn it after all.
WorkerStart = Callable[[Callable[..., Any], Connection, tuple[Any, ...]], Any]
_start_elsewhere: WorkerStart | None = None


def start_workers_with(start: WorkerStart | None) -> None:
    """Start this process's pools' workers with `start` (None: spawn them)."""
    global _start_elsewhere
    _start_elsewhere = start


def worker_env(threads: int) -> dict[str, str]:
    """What a Ray task of `threads` CPUs and no GPU finds in its environment."""
    return {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "CUDA_VISIBLE_DEVICES": ""}


def _serve(conn: Connection, setup: Callable[[], Any] | None, env: Mapping[str, str]) -> None:
    """A worker's life: set up, then run each `(fn, args)` received and send back its result
    (or a `RemoteError`), until told to stop (None) or the driver is gone."""
    os.environ.update(env)
    if "torch" in sys.modules and "OMP_NUM_THREADS" in env:  # loaded before this (a forked worker):
        sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))  # the variable came too late
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if setup is not None:
        setup()
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if task is None:
            return
        fn, args = task
        try:
            result: Any = fn(*args)
        except Exception:
            result = RemoteError(traceback.format_exc())
        try:
            conn.send(result)
        except Exception as err:  # e.g. an exception object that does not pickle
            conn.send(RemoteError(f"the task's result could not be sent back: {err!r}\n{result!r}"))


@dataclass
class _Worker:
    process: Any  # a multiprocessing.Process, or what `_start_elsewhere` returned
    conn: Connection
    task: tuple[Any, Callable[..., Any], tuple[Any, ...]] | None = None  # (key, fn, args) under way


class ProcessPool:
    """`size` spawned worker processes, each running one task at a time.

    `setup()` runs first in each (its imports, say); the workers start at once, so that it
    overlaps whatever the caller does until its first `run`. Use as a context manager:
    leaving stops the workers, and kills them if it is left by an exception (a stop signal).
    """

    def __init__(self, size: int, *, setup: Callable[[], Any] | None = None, env: Mapping[str, str] | None = None,
                 name: str = "pool-worker") -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._setup, self._env, self._name = setup, dict(env or {}), name
        self._workers: list[_Worker] = []
        try:
            for _ in range(size):
                self._workers.append(self._start())
        except BaseException:
            self.terminate()
            raise

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        args = (self._setup, self._env)
        process = _start_elsewhere(_serve, child, args) if _start_elsewhere is not None else None
        if process is None:
            process = self._ctx.Process(target=_serve, args=(child, *args), name=self._name,
                                        daemon=True)  # never outlives the driver, whatever ends it
            process.start()
        child.close()
        return _Worker(process, parent)

    @property
    def pids(self) -> list[int | None]:
        return [w.process.pid for w in self._workers]

    def run(self, tasks: Iterable[tuple[Any, Callable[..., Any], tuple[Any, ...]]]) -> Iterator[tuple[Any, Any]]:
        """Run each `(key, fn, args)` on a free worker; yield `(key, result)` as each ends, in
        the order they end. A task that raised yields a `RemoteError`, one whose worker died
        a `WorkerLost`, as its result. `fn` and `args` must pickle (a function by reference)."""
        queue = list(tasks)[::-1]
        while True:
            for worker in self._workers:
                if worker.task is None and queue:
                    worker.task = queue.pop()
                    _, fn, args = worker.task
                    try:
                        worker.conn.send((fn, args))
                    except OSError:  # it died idle (its set-up failed, say): its sentinel tells below
                        pass
            busy = [w for w in self._workers if w.task is not None]
            if not busy:
                return
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=POLL_S))
            for worker in busy:
                if worker.conn in ready:
                    try:
                        result = worker.conn.recv()
                    except (EOFError, OSError):  # died after all: its sentinel says so below
                        ready.add(worker.process.sentinel)
                    else:
                        key, worker.task = worker.task[0], None
                        yield key, result
                        continue
                if worker.process.sentinel in ready:
                    yield self._replace(worker)

    def _replace(self, dead: _Worker) -> tuple[Any, WorkerLost]:
        dead.process.join()
        code = dead.process.exitcode or 0
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        key = dead.task[0] if dead.task is not None else None
        dead.conn.close()
        self._workers[self._workers.index(dead)] = self._start()
        return key, WorkerLost(f"worker process {dead.process.pid} died ({how}) while it held the task; "
                               "SIGKILL usually means the machine ran out of memory")

    def close(self) -> None:
        """Tell every worker to stop, wait for them (at most STOP_TIMEOUT_S), kill any left."""
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:  # already gone
                pass
        for worker in self._workers:
            worker.process.join(STOP_TIMEOUT_S)
        self.terminate()

    def terminate(self) -> None:
        """Stop every worker now, with SIGTERM and then, after STOP_TIMEOUT_S, SIGKILL."""
        for worker in self._workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in self._workers:
            worker.process.join(STOP_TIMEOUT_S)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers = []

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: Any) -> None:
        if kind is None:
            self.close()
        else:
            self.terminate()
