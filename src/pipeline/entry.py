"""The shared body of the Hydra command lines (`python -m pipeline.train|cv|tune|compare`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from pipeline.errors import PipelineError

T = TypeVar("T")


def run_adhoc(cfg: DictConfig, task: Callable[[DictConfig], T]) -> T:
    """Run `task(cfg)` with outputs in Hydra's run folder (never over the DVC pipeline's),
    the dataset fetched and split first if missing, and a user error printed (no traceback)
    with its exit code."""
    from pipeline.tasks.prepare import ensure_data

    with open_dict(cfg):
        cfg.paths.out_dir = HydraConfig.get().runtime.output_dir
    try:
        ensure_data(cfg)
        return task(cfg)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
