"""Learning-rate schedules, chosen by name, returned as Lightning lr-scheduler configs.

Per-epoch schedules are the multiplier of the base rate at epoch t (t = completed epochs),
each its textbook formula, driven by a LambdaLR:

    none         1
    step         gamma ** floor(t / step_size)
    multistep    gamma ** (number of milestones <= t)
    exponential  exp(-decay * t)
    inverse_time 1 / (1 + decay * t)
    cosine       r + (1 - r) * (1 + cos(pi * t / max_epochs)) / 2,   r = min_lr_ratio

With `warmup_epochs` = W > 0 the multiplier is also scaled by min(1, (t + 1) / (W + 1)).
`onecycle` (Smith's 1cycle, torch's OneCycleLR) steps every optimizer step over
max_epochs * steps_per_epoch steps; `plateau` (ReduceLROnPlateau) reads a monitored metric.
"""

from __future__ import annotations

import bisect
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, ReduceLROnPlateau

from pipeline.config import plain
from pipeline.errors import ConfigError

Multiplier = Callable[[int], float]

# Arguments the caller supplies (from the trainer), never config keys.
_CONTEXT = {"max_epochs", "steps_per_epoch", "monitor"}


def _none() -> Multiplier:
    return lambda t: 1.0


def _step(step_size: int = 10, gamma: float = 0.1) -> Multiplier:
    return lambda t: gamma ** (t // step_size)


def _multistep(milestones: Sequence[int] = (30, 60), gamma: float = 0.1) -> Multiplier:
    marks = sorted(milestones)
    return lambda t: gamma ** bisect.bisect_right(marks, t)


def _exponential(decay: float = 0.05) -> Multiplier:
    return lambda t: math.exp(-decay * t)


def _inverse_time(decay: float = 0.1) -> Multiplier:
    return lambda t: 1.0 / (1.0 + decay * t)


def _cosine(min_lr_ratio: float = 0.0, *, max_epochs: int) -> Multiplier:
    return lambda t: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, max_epochs) / max_epochs))


# name -> factory of the multiplier f(t); lr(t) = lr0 * f(t). Each is also a per-epoch
# entry of SCHEDULERS below, which maps every name to its Lightning scheduler config.
MULTIPLIERS: dict[str, Callable[..., Multiplier]] = {
    "none": _none,
    "step": _step,
    "multistep": _multistep,
    "exponential": _exponential,
    "inverse_time": _inverse_time,
    "cosine": _cosine,
}


def _config_keys(fn: Callable) -> set[str]:
    return set(inspect.signature(fn).parameters) - _CONTEXT - {"optimizer"}


def _check_unknown(name: str, kwargs: Mapping[str, Any], accepted: set[str]) -> None:
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"scheduler.{unknown[0]} is not an option of {name}; it takes: {', '.join(sorted(accepted))}.")


def lr_multiplier(name: str, *, warmup_epochs: int = 0, max_epochs: int | None = None, **kwargs: Any) -> Multiplier:
    """f(t) such that lr(t) = lr0 * f(t); linear warm-up over the first `warmup_epochs`.
    `max_epochs` is needed by `cosine` only."""
    if name not in MULTIPLIERS:
        raise ConfigError(f"scheduler.name={name!r} has no per-epoch multiplier; those are: "
                          f"{', '.join(sorted(MULTIPLIERS))}.")
    factory = MULTIPLIERS[name]
    _check_unknown(name, kwargs, _config_keys(factory) | {"warmup_epochs"})
    if "max_epochs" in inspect.signature(factory).parameters:
        if not max_epochs:
            raise ConfigError(f"scheduler {name} needs the run length (max_epochs).")
        kwargs["max_epochs"] = max_epochs
    base = factory(**kwargs)
    if warmup_epochs <= 0:
        return base
    return lambda t: base(t) * min(1.0, (t + 1) / (warmup_epochs + 1))


# ------------------------------------------------------------ Lightning scheduler configs

class WarmupPlateau(ReduceLROnPlateau):
    """ReduceLROnPlateau after an optional linear warm-up: during the first `warmup_epochs`
    epochs lr = lr0 * (t + 1) / (W + 1) and the metric is not read."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup_epochs: int = 0, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        self.warmup_epochs = warmup_epochs
        self.target_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.epochs_done = 0
        self._warm()

    def _warm(self) -> None:
        factor = min(1.0, (self.epochs_done + 1) / (self.warmup_epochs + 1))
        for group, lr in zip(self.optimizer.param_groups, self.target_lrs):
            group["lr"] = lr * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def step(self, metrics: Any, epoch: None = None) -> None:  # type: ignore[override]
        self.epochs_done += 1
        if self.epochs_done <= self.warmup_epochs:
            self.last_epoch += 1
            self._warm()
            return
        super().step(metrics)


class OneCycle(OneCycleLR):
    """torch's OneCycleLR, except that once the last step's rate (the minimum) is reached it
    stays there: torch extrapolates the last phase past its end (a linear anneal goes
    negative after the final step) and raises beyond `total_steps`."""

    def get_lr(self) -> list[float]:
        if self.last_epoch >= self.total_steps - 1:
            return [group["min_lr"] for group in self.optimizer.param_groups]
        return super().get_lr()


def _per_epoch(name: str) -> Callable[..., dict[str, Any]]:
    def build(optimizer: torch.optim.Optimizer, *, max_epochs: int, **kwargs: Any) -> dict[str, Any]:
        return {"scheduler": LambdaLR(optimizer, lr_multiplier(name, max_epochs=max_epochs, **kwargs)),
                "interval": "epoch"}

    build.keys = _config_keys(MULTIPLIERS[name]) | {"warmup_epochs"}  # type: ignore[attr-defined]
    return build


def _onecycle(optimizer: torch.optim.Optimizer, *, max_epochs: int, steps_per_epoch: int,
              warmup_epochs: int = 0, max_lr_factor: float = 1.0, pct_start: float = 0.3,
              div_factor: float = 25.0, final_div_factor: float = 1e4, anneal_strategy: str = "linear",
              three_phase: bool = True, cycle_momentum: bool = False, base_momentum: float = 0.85,
              max_momentum: float = 0.95) -> dict[str, Any]:
    """Peak lr = max_lr_factor * the optimizer's lr, reached after pct_start of all steps."""
    if warmup_epochs:
        raise ConfigError("scheduler.warmup_epochs must be 0 for onecycle: its first phase is the warm-up "
                          "(set scheduler.pct_start, the fraction of steps it lasts).")
    max_lrs = [max_lr_factor * float(g["lr"]) for g in optimizer.param_groups]
    scheduler = OneCycle(optimizer, max_lr=max_lrs, total_steps=int(max_epochs * steps_per_epoch),
                         pct_start=float(pct_start), div_factor=div_factor, final_div_factor=final_div_factor,
                         anneal_strategy=anneal_strategy, three_phase=three_phase,
                         cycle_momentum=cycle_momentum, base_momentum=base_momentum,
                         max_momentum=max_momentum)
    return {"scheduler": scheduler, "interval": "step"}


def _plateau(optimizer: torch.optim.Optimizer, *, monitor: str, warmup_epochs: int = 0, mode: str = "max",
             factor: float = 0.1, patience: int = 5, threshold: float = 1e-4, cooldown: int = 0,
             min_lr: float = 0.0) -> dict[str, Any]:
    """lr *= factor once the monitored metric has not improved for more than `patience` epochs."""
    scheduler = WarmupPlateau(optimizer, warmup_epochs=warmup_epochs, mode=mode, factor=factor,
                              patience=patience, threshold=threshold, cooldown=cooldown, min_lr=min_lr)
    return {"scheduler": scheduler, "interval": "epoch", "monitor": monitor, "strict": True}


# name -> builder(optimizer, *, max_epochs, steps_per_epoch, monitor, **config) -> Lightning config.
SCHEDULERS: dict[str, Callable[..., dict[str, Any]]] = {
    **{name: _per_epoch(name) for name in MULTIPLIERS},
    "onecycle": _onecycle,
    "plateau": _plateau,
}


def scheduler_keys(name: str) -> set[str]:
    """The config keys (besides `name`) scheduler `name` takes."""
    builder = SCHEDULERS[name]
    return getattr(builder, "keys", None) or _config_keys(builder)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, *, max_epochs: int, steps_per_epoch: int,
                    monitor: str = "val/acc", **kwargs: Any) -> dict[str, Any]:
    """The Lightning lr-scheduler config (`scheduler`, `interval`, and `monitor` for plateau)."""
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler.name={name!r} is not one of: {', '.join(sorted(SCHEDULERS))}.")
    _check_unknown(name, kwargs, scheduler_keys(name))
    builder = SCHEDULERS[name]
    context = {"max_epochs": max_epochs, "steps_per_epoch": steps_per_epoch, "monitor": monitor}
    accepted = inspect.signature(builder).parameters
    context = {k: v for k, v in context.items() if k in accepted}
    if "milestones" in kwargs:
        kwargs["milestones"] = list(kwargs["milestones"])
    try:
        return builder(optimizer, **context, **kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"scheduler ({name}) rejected its settings: {err}") from err


# ---------------------------------------------------------------------------- validation

_NUMBER_CHECKS: dict[str, dict[str, Any]] = {
    "warmup_epochs": dict(integer=True, low=0),
    "step_size": dict(integer=True, low=1),
    "gamma": dict(low=0, high=1, low_open=True),
    "decay": dict(low=0),
    "min_lr_ratio": dict(low=0, high=1),
    "max_lr_factor": dict(low=0, low_open=True),
    "pct_start": dict(low=0, high=1, low_open=True, high_open=True),
    "div_factor": dict(low=0, low_open=True),
    "final_div_factor": dict(low=0, low_open=True),
    "base_momentum": dict(low=0, high=1, high_open=True),
    "max_momentum": dict(low=0, high=1, high_open=True),
    "factor": dict(low=0, high=1, low_open=True, high_open=True),
    "patience": dict(integer=True, low=0),
    "threshold": dict(low=0),
    "cooldown": dict(integer=True, low=0),
    "min_lr": dict(low=0),
}
_BOOL_KEYS = {"three_phase", "cycle_momentum"}
_CHOICES = {"anneal_strategy": ("cos", "linear"), "mode": ("max", "min")}


def validate_scheduler(cfg: Mapping[str, Any], *, max_epochs: int, dry_build: bool = True) -> None:
    """Check the scheduler group: name, keys, types and ranges, then (`dry_build`) a build over
    the run, and, for per-epoch formulas, that f(t) is a finite non-negative factor at every
    epoch."""
    from pipeline.config import check_bool, check_choice, check_number

    cfg = plain(cfg)
    name = cfg.get("name")
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise ConfigError(f"scheduler.name={name!r} is not one of: {', '.join(sorted(SCHEDULERS))}.")
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    _check_unknown(name, kwargs, scheduler_keys(name))
    view = OmegaConf.create({"scheduler": kwargs})
    for key, value in kwargs.items():
        path = f"scheduler.{key}"
        if key in _NUMBER_CHECKS:
            check_number(view, path, **_NUMBER_CHECKS[key])
        elif key in _BOOL_KEYS:
            check_bool(view, path)
        elif key in _CHOICES:
            check_choice(view, path, _CHOICES[key])
        elif key == "milestones":
            ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
                isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in value)
            if not ok or list(value) != sorted(set(value)):
                raise ConfigError(f"scheduler.milestones must be a non-empty increasing list of epochs >= 1, got {value!r}.")
    settings = {n: p.default for n, p in inspect.signature(SCHEDULERS[name]).parameters.items()} | kwargs
    if settings.get("three_phase") is True and settings.get("pct_start", 0) > 0.5:
        raise ConfigError(f"scheduler.pct_start={settings['pct_start']} is out of range: with three_phase the "
                          "rise and the fall take 2 * pct_start of the run, so it must be <= 0.5.")
    if dry_build:
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=1.0, momentum=0.9)
        build_scheduler(optimizer, name, max_epochs=max_epochs, steps_per_epoch=1, **kwargs)
    if name in MULTIPLIERS:
        f = lr_multiplier(name, max_epochs=max_epochs, **kwargs)
        bad = [t for t in range(max_epochs) if not math.isfinite(f(t)) or f(t) < 0]
        if bad:
            raise ConfigError(f"scheduler {name} gives an invalid learning-rate factor at epoch {bad[0]}.")
