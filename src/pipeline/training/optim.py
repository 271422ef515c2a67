"""Optimizers and learning-rate schedules, chosen by name through small tables.

Schedules are written as the multiplier of the base learning rate at epoch t, so each
is its textbook formula (exp(-k t), gamma^floor(t/s), ...) and composes with warm-up.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from omegaconf import OmegaConf

from pipeline.errors import ConfigError

# name -> optimizer class; its keyword arguments are the config keys besides `name`.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}


def build_optimizer(params: Iterable, name: str, **kwargs: Any) -> torch.optim.Optimizer:
    """`build_optimizer(model.parameters(), "sgd", lr=0.1, momentum=0.9)`."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name={name!r} is not one of: {', '.join(sorted(OPTIMIZERS))}.")
    cls = OPTIMIZERS[name]
    accepted = set(inspect.signature(cls).parameters) - {"params"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"optimizer.{unknown[0]} is not an option of {name}; it takes: {', '.join(sorted(accepted))}.")
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    try:
        return cls(params, **kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"optimizer ({name}) rejected its settings: {err}") from err


def validate_optimizer(cfg: dict[str, Any]) -> None:
    """Check the optimizer group before training: types, ranges, then a dry build."""
    from pipeline.config import check_number

    view = OmegaConf.create({"optimizer": cfg})
    check_number(view, "optimizer.lr", low=0, low_open=True)
    if "weight_decay" in cfg:
        check_number(view, "optimizer.weight_decay", low=0)
    if "momentum" in cfg:
        check_number(view, "optimizer.momentum", low=0, high=1, high_open=True)
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.get("name"), **kwargs)


# ---------------------------------------------------------------------------- schedules

def _none() -> Callable[[int], float]:
    return lambda t: 1.0


def _step(step_size: int = 10, gamma: float = 0.1) -> Callable[[int], float]:
    return lambda t: gamma ** (t // step_size)


def _exponential(decay: float = 0.05) -> Callable[[int], float]:
    return lambda t: math.exp(-decay * t)


# name -> factory of the multiplier function f(t), t = completed epochs.
SCHEDULES: dict[str, Callable[..., Callable[[int], float]]] = {
    "none": _none,
    "step": _step,
    "exponential": _exponential,
}


def lr_multiplier(name: str, *, warmup_epochs: int = 0, **kwargs: Any) -> Callable[[int], float]:
    """f(t) such that lr(t) = lr0 * f(t); linear warm-up over the first `warmup_epochs`."""
    if name not in SCHEDULES:
        raise ConfigError(f"scheduler.name={name!r} is not one of: {', '.join(sorted(SCHEDULES))}.")
    factory = SCHEDULES[name]
    accepted = set(inspect.signature(factory).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"scheduler.{unknown[0]} is not an option of {name}; it takes: "
                          f"{', '.join(sorted(accepted | {'warmup_epochs'}))}.")
    base = factory(**kwargs)
    if warmup_epochs <= 0:
        return base
    return lambda t: base(t) * min(1.0, (t + 1) / (warmup_epochs + 1))


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, **kwargs: Any) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-epoch LambdaLR following the named formula."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(name, **kwargs))


def validate_scheduler(cfg: dict[str, Any], *, max_epochs: int) -> None:
    """Check the scheduler group: types and ranges, then evaluate f(t) over the run."""
    from pipeline.config import check_number

    view = OmegaConf.create({"scheduler": cfg})
    check_number(view, "scheduler.warmup_epochs", integer=True, low=0)
    if "step_size" in cfg:
        check_number(view, "scheduler.step_size", integer=True, low=1)
    if "gamma" in cfg:
        check_number(view, "scheduler.gamma", low=0, high=1, low_open=True)
    if "decay" in cfg:
        check_number(view, "scheduler.decay", low=0)
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    f = lr_multiplier(cfg.get("name"), **kwargs)
    bad = [t for t in range(max_epochs) if not math.isfinite(f(t)) or f(t) < 0]
    if bad:
        raise ConfigError(f"scheduler {cfg.get('name')} gives an invalid learning-rate factor at epoch {bad[0]}.")
