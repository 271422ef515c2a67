"""The shared body of the Hydra command lines (`python -m pipeline.train|cv|tune|compare`)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
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

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    with open_dict(cfg):
        cfg.paths.out_dir = str(out_dir)
    try:
        ensure_data(cfg)
        return task(cfg)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        _drop_if_unused(out_dir)
        sys.exit(err.exit_code)


def _drop_if_unused(out_dir: Path) -> None:
    """A run refused before writing anything leaves no folder behind: Hydra made it, with
    only its `.hydra/` record of the config, before the task could check that config."""
    if out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= {".hydra"}:
        shutil.rmtree(out_dir)
        for parent in (out_dir.parent, out_dir.parent.parent):  # outputs/<date>/, outputs/, if now empty
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
