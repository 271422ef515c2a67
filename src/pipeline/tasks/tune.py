"""The tune task: a Ray Tune sweep of the train task (`pipeline.tuning`), tracked as one
MLflow parent run with a child run per trial; the best trial's overrides go to
`results/tune/best.yaml`, where the train task starts when `tune.use_best`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from pipeline.tasks.train import train
from pipeline.tuning.driver import run_sweep


def tune(cfg: DictConfig, *, trial_callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run the configured sweep; returns the best trial's summary (`best.yaml` without the
    config). `trial_callbacks` are extra Lightning callbacks for every trial (picklable)."""
    # The tuning library sits below the tasks: it is handed the function each trial trains with.
    return run_sweep(cfg, train=train, trial_callbacks=trial_callbacks)
