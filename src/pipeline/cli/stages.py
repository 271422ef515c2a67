"""The DVC stage runner: `python -m pipeline.cli.stages <name> [params.yaml]`, as dvc.yaml calls it.

A stage reads `params.yaml` (DVC's composition of `conf/`) and calls its task; `STAGES` maps
each stage to its task function as a string, so a stage imports its own task only (and
`pipeline deps` reads the same table to list each stage's code dependencies).
"""

from __future__ import annotations

import importlib
import sys

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


def run_stage(stage: str, params: str = "params.yaml") -> int:
    """Run one stage's task on `params`; its exit status."""

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
