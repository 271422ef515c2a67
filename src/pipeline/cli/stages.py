"""The DVC stage runner: `python -m pipeline.cli.stages <name> [params.yaml]`, as dvc.yaml calls it.

A stage reads `params.yaml` (DVC's composition of `conf/`) and calls its task; `STAGES` maps
each stage to its task function as a string, so a stage imports its own task only (and
`pipeline deps` reads the same table to list each stage's code dependencies).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time

from pipeline.cli import exits
from pipeline.errors import ConfigError

STAGES: dict[str, str] = {
    "fetch": "pipeline.tasks.data:fetch",
    "split": "pipeline.tasks.data:split",
    "tune": "pipeline.tasks.tune:tune",
    "train": "pipeline.tasks.train:train",
    "evaluate": "pipeline.tasks.evaluate:evaluate",
    "cv": "pipeline.tasks.cv:cross_validate",
    "compare": "pipeline.tasks.compare:compare",
    "report": "pipeline.tasks.report:report",
}


def task_module(stage: str) -> str:
    """The module holding `stage`'s task function."""
    return STAGES[stage].partition(":")[0]


def _end_with_dvc(poll_s: float = 1.0) -> None:
    """Under `dvc repro` (DVC sets DVC_STAGE), terminate this stage once DVC is gone. DVC dies
    on SIGTERM (`kill`, `timeout`) without passing it on; a stage left running would go on to
    write outputs that look complete but that no dvc.lock records, and end its MLflow run
    FINISHED. (DVC runs the command through `$SHELL -c`, which bash and dash replace by the
    command itself, so the parent is DVC.)"""
    if "DVC_STAGE" not in os.environ:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)  # the main thread's handler raises Terminated

    threading.Thread(target=watch, name="end-with-dvc", daemon=True).start()


def run_stage(stage: str, params: str = "params.yaml") -> int:
    """Run one stage's task on `params`; its exit status."""
    _end_with_dvc()

    def body() -> None:
        from pipeline.config import load_params

        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}.")
        module, _, name = STAGES[stage].partition(":")
        task = getattr(importlib.import_module(module), name)
        task(load_params(params))

    return exits.run(body)


if __name__ == "__main__":
    sys.exit(run_stage(*sys.argv[1:3]) if len(sys.argv) > 1 else run_stage(""))
