"""The DVC stage runner: `python -m pipeline.cli.stages <name> [params.yaml]`, as dvc.yaml calls it.

A stage reads `params.yaml` (DVC's composition of `conf/`), calls its task and prints its
summary; `STAGES` and `SUMMARIES` map each stage to those functions as strings, so a stage
imports its own only (and `pipeline deps` reads the same tables to list each stage's code
dependencies).
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.cli import exits, warm
from pipeline.errors import ConfigError
from pipeline.quiet import quiet

STAGES: dict[str, str] = {
    "fetch": "pipeline.tasks.data:fetch",
    "split": "pipeline.tasks.data:split",
    "tune": "pipeline.tasks.tune:tune",
    "train": "pipeline.tasks.train:train",
    "evaluate": "pipeline.tasks.evaluate:evaluate",
    "cv": "pipeline.tasks.cv:cv",
    "compare": "pipeline.tasks.compare:compare",
    "report": "pipeline.tasks.report:report",
}
# Stages that never train: their config check builds no optimizer (`prepare(trains=False)`);
# of those, the data stages build no model either (`prepare(models=False)`: no torch import).
NOT_TRAINING = ("fetch", "split", "evaluate", "report")
NO_MODEL = ("fetch", "split")


# What a stage prints when its task returns (`pipeline.cli.summaries`: what its command
# prints); fetch and split say what they do as they go.
SUMMARIES: dict[str, str] = {
    "tune": "pipeline.cli.summaries:tune",
    "train": "pipeline.cli.summaries:train",
    "evaluate": "pipeline.cli.summaries:train",  # the test metrics, joining the train run's
    "cv": "pipeline.cli.summaries:cv",
    "compare": "pipeline.cli.summaries:compare",
    "report": "pipeline.cli.summaries:report",
}


def task_module(stage: str) -> str:
    """The module holding `stage`'s task function."""
    return STAGES[stage].partition(":")[0]


def stage_modules(stage: str) -> list[str]:
    """The modules `stage` imports beside this runner: its task's, and its summary's."""
    summary = SUMMARIES.get(stage)
    return [task_module(stage), *([summary.partition(":")[0]] if summary else [])]


_SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"})


def _parent_of(pid: int) -> int | None:
    """`pid`'s parent, or None once `pid` is gone (Linux /proc; `ps` elsewhere)."""
    if Path("/proc/self").exists():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            return int(stat.rpartition(")")[2].split()[1])  # after the name, which may hold spaces
        except (OSError, ValueError, IndexError):
            return None
    out = subprocess.run(["ps", "-o", "ppid=", "-p", str(pid)], capture_output=True, text=True).stdout
    return int(out) if out.strip() else None


def _name_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        out = subprocess.run(["ps", "-o", "comm=", "-p", str(pid)], capture_output=True, text=True).stdout
        return Path(out.strip()).name


def _links_to_dvc() -> list[tuple[int, int]]:
    """The (process, parent) links from this process up to DVC, through the shell DVC runs the
    command with: bash execs a `-c` command, but dash (`/bin/sh` when `$SHELL` is unset, as on
    CI machines) stays as our parent and waits, so our parent outlives DVC."""
    links = [(os.getpid(), os.getppid())]
    while _name_of(links[-1][1]) in _SHELLS:
        shell = links[-1][1]
        grandparent = _parent_of(shell)
        if not grandparent or grandparent == 1:
            break
        links.append((shell, grandparent))
    return links


def _end_with_dvc(poll_s: float = 1.0) -> None:
    """Under `dvc repro` (DVC sets DVC_STAGE), terminate this stage once DVC is gone. DVC dies
    on SIGTERM (`kill`, `timeout`) without passing it on; a stage left running would go on to
    write outputs that look complete but that no dvc.lock records, and end its MLflow run
    FINISHED. DVC is gone when any link between it and us breaks (a process orphaned is
    re-parented)."""
    if "DVC_STAGE" not in os.environ:
        return
    links = _links_to_dvc()

    def watch() -> None:
        while all(_parent_of(pid) == parent for pid, parent in links):
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)  # the main thread's handler raises Terminated

    threading.Thread(target=watch, name="end-with-dvc", daemon=True).start()


# Loggers of long work's progress lines (INFO), shown as the Hydra apps show them
# (conf/hydra/job_logging): the image-folder fetch, cross-validation's folds.
PROGRESS_LOGGERS = ("pipeline.data.imagefolder", "pipeline.tasks.cv")


def _show_progress() -> None:
    """The progress lines on stderr; every other logger keeps Python's default (warnings only)."""
    for name in PROGRESS_LOGGERS:
        progress = logging.getLogger(name)
        if not progress.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
            progress.addHandler(handler)
            progress.setLevel(logging.INFO)


def run_stage(stage: str, params: str = "params.yaml", *, watch_dvc: bool = True) -> int:
    """Run one stage's task on `params`; its exit status. `watch_dvc=False` in a warm
    server's child, whose client watches DVC."""
    if watch_dvc:
        _end_with_dvc()
    quiet()  # PIPELINE_VERBOSE=1 dvc repro shows everything
    _show_progress()

    def body() -> None:
        from pipeline.config import PARAMS_FIX, load_params
        from pipeline.validation import prepare

        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}.")
        cfg = load_params(params)
        try:
            # Before the task's (slow) imports: a bad value fails in a second, naming the file.
            prepare(copy.deepcopy(cfg), trains=stage not in NOT_TRAINING, models=stage not in NO_MODEL)
        except ConfigError as err:
            raise ConfigError(f"{params}: {err} ({params} {PARAMS_FIX}.)") from err
        module, _, name = STAGES[stage].partition(":")
        task = getattr(importlib.import_module(module), name)
        result = task(cfg)
        if stage in SUMMARIES:  # the same lines as the task's command prints
            module, _, name = SUMMARIES[stage].partition(":")
            print("\n".join(getattr(importlib.import_module(module), name)(cfg, result)), flush=True)

    return exits.run(body)


def main(argv: list[str]) -> int:
    """The stage `argv` (name, params file) in this process, or with `PIPELINE_WARM=1` in a
    warm server's child (`pipeline.cli.warm`) for the stages that build a model."""
    args = argv[:2] or [""]
    if warm.wanted():
        if args[0] in NO_MODEL:  # quick without torch: the server imports while they run
            warm.start_server()
        elif args[0] in STAGES:
            _end_with_dvc()
            try:
                status = warm.delegate(args)
            except KeyboardInterrupt:  # before the stage began
                return exits.INTERRUPTED
            if status is not None:
                return status
            return run_stage(*args, watch_dvc=False)
    return run_stage(*args)


if __name__ == "__main__":
    exits.leave(main(sys.argv[1:]))
