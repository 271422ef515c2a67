"""The tune task: a Ray Tune sweep of the train task (`pipeline.tuning`), tracked as one
MLflow parent run with a child run per trial; the best trial's overrides go to
`results/tune/best.yaml`, where the train task starts when `tune.use_best`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from pipeline.layout import Layout
from pipeline.tasks.common import TrainingData, load_data, sweep_inputs
from pipeline.tuning.driver import run_sweep
from pipeline.tuning.plan import plan_sweep
from pipeline.validation import refuse_resume


def tune(cfg: DictConfig, *, trial_callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run the configured sweep; returns the best trial's summary (`best.yaml` without the
    config). `trial_callbacks` are extra Lightning callbacks for every trial (picklable)."""
    refuse_resume(cfg, "a sweep")
    # The tuning library sits below the tasks: it is handed the function each trial trains
    # with, and the one that reads the data they all train on.
    return run_sweep(cfg, train=_train, load=_load, inputs=sweep_inputs, trial_callbacks=trial_callbacks)


def _train(cfg: DictConfig, **kwargs: Any) -> dict[str, float]:
    """The train task, imported where a trial calls it: the driver never imports Lightning,
    which would cost it 4 s here before Ray starts (each trial's process imports it anyway)."""
    from pipeline.tasks.train import train

    return train(cfg, **kwargs)


def check_sweep(cfg: DictConfig) -> DictConfig:
    """Validate the sweep as `tune` would before Ray starts (every trial config the space can
    produce); the prepared config."""
    refuse_resume(cfg, "a sweep")
    return plan_sweep(cfg).cfg


def _load(cfg: DictConfig) -> TrainingData:
    return load_data(cfg, Layout.from_cfg(cfg))
