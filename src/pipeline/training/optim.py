"""Optimizers, chosen by name through one table; the schedules live in `schedules.py`.

Each entry of `OPTIMIZERS` is a factory (a torch class, or a preset of one) whose keyword
arguments are the config keys besides `name`. A wrapper (Lookahead) instead takes `base`,
itself an optimizer config from the same table, so Lookahead wraps any of them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf

from pipeline.config import plain
from pipeline.errors import ConfigError
from pipeline.training.lookahead import Lookahead


def _ranger(params: Iterable, *, k: int = 6, alpha: float = 0.5, **radam: Any) -> Lookahead:
    """Ranger (Wright, 2019): RAdam inside Lookahead."""
    return Lookahead(torch.optim.RAdam(params, **radam), k=k, alpha=alpha)


def _keywords(*callables: Callable) -> set[str]:
    """Named keyword parameters of the callables (not `params`, not **kwargs)."""
    out: set[str] = set()
    for fn in callables:
        out |= {n for n, p in inspect.signature(fn).parameters.items()
                if n not in ("params", "base") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return out


# A check is (key, check_number keyword arguments); keys mean the same in every optimizer
# unless an entry overrides them (RMSprop's `alpha` is a smoothing constant, Lookahead's a step).
_NUMBER_CHECKS: dict[str, dict[str, Any]] = {
    "lr": dict(low=0, low_open=True),
    "weight_decay": dict(low=0),
    "momentum": dict(low=0, high=1, high_open=True),
    "dampening": dict(low=0, high=1),
    "eps": dict(low=0, low_open=True),
    "lr_decay": dict(low=0),
    "initial_accumulator_value": dict(low=0),
    "rho": dict(low=0, high=1),                            # Adadelta: decay of both running means
    "alpha": dict(low=0, high=1, low_open=True),           # Lookahead: slow-weight step size
    "k": dict(integer=True, low=1),                        # Lookahead: inner steps per sync
}
_BOOL_KEYS = {"nesterov", "amsgrad", "centered", "maximize", "decoupled_weight_decay"}


@dataclass(frozen=True)
class OptimizerSpec:
    """How one optimizer name is built: `factory(params, **config)`, or for a wrapper
    `factory(built_base_optimizer, **config)`."""

    factory: Callable[..., torch.optim.Optimizer]
    keys: frozenset[str]
    wraps: bool = False
    checks: Mapping[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, factory: Callable, *more: Callable, wraps: bool = False, **checks: dict[str, Any]) -> OptimizerSpec:
        keys = _keywords(factory, *more) | ({"base"} if wraps else set())
        return cls(factory, frozenset(keys), wraps, checks)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec.of(torch.optim.SGD),
    "momentum": OptimizerSpec.of(functools.partial(torch.optim.SGD, momentum=0.9)),
    "nesterov": OptimizerSpec.of(functools.partial(torch.optim.SGD, momentum=0.9, nesterov=True)),
    "adagrad": OptimizerSpec.of(torch.optim.Adagrad),
    "adadelta": OptimizerSpec.of(torch.optim.Adadelta),
    "rmsprop": OptimizerSpec.of(torch.optim.RMSprop, alpha=dict(low=0, high=1, high_open=True)),
    "adam": OptimizerSpec.of(torch.optim.Adam),
    "adamw": OptimizerSpec.of(torch.optim.AdamW),
    "radam": OptimizerSpec.of(torch.optim.RAdam),
    "lookahead": OptimizerSpec.of(Lookahead, wraps=True),
    "ranger": OptimizerSpec.of(_ranger, torch.optim.RAdam),
}


def _spec(name: Any, where: str) -> OptimizerSpec:
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ConfigError(f"{where}.name={name!r} is not one of: {', '.join(sorted(OPTIMIZERS))}.")
    return OPTIMIZERS[name]


def _check_keys(spec: OptimizerSpec, name: str, kwargs: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(kwargs) - spec.keys)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not an option of {name}; it takes: {', '.join(sorted(spec.keys))}.")
    if spec.wraps and not isinstance(kwargs.get("base"), Mapping):
        raise ConfigError(f"{where}.base must be an optimizer config (name, lr, ...) for {name} to wrap.")


def _build(params: Iterable, cfg: Mapping[str, Any], where: str) -> torch.optim.Optimizer:
    kwargs = plain(cfg)
    name = kwargs.pop("name", None)
    spec = _spec(name, where)
    _check_keys(spec, name, kwargs, where)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    try:
        if spec.wraps:
            inner = _build(params, kwargs.pop("base"), f"{where}.base")
            return spec.factory(inner, **kwargs)
        return spec.factory(params, **kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where} ({name}) rejected its settings: {err}") from err


def build_optimizer(params: Iterable, name: str, **kwargs: Any) -> torch.optim.Optimizer:
    """`build_optimizer(model.parameters(), "momentum", lr=0.1)`;
    `build_optimizer(ps, "lookahead", k=5, alpha=0.5, base={"name": "adam", "lr": 1e-3})`."""
    return _build(params, {"name": name, **kwargs}, "optimizer")


def validate_optimizer(cfg: Mapping[str, Any], *, where: str = "optimizer", dry_build: bool = True) -> None:
    """Check the optimizer group before training: name, keys, types and ranges (a wrapper's
    `base` too, as `optimizer.base.*`), then (`dry_build`) a build on one parameter, which
    catches what only the optimizer's constructor checks (SGD's nesterov without momentum)."""
    from pipeline.config import check_bool, check_number

    cfg = plain(cfg)
    spec = _spec(cfg.get("name"), where)
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    _check_keys(spec, cfg["name"], kwargs, where)
    view = OmegaConf.create({"cfg": {k: v for k, v in kwargs.items() if k != "base"}})
    if "lr" in spec.keys and "lr" not in kwargs:
        raise ConfigError(f"{where}.lr is required but not set: add `{where}.lr=...`.")
    for key in kwargs:
        path, shown = f"cfg.{key}", f"{where}.{key}"
        check = spec.checks.get(key, _NUMBER_CHECKS.get(key))
        try:
            if check is not None:
                check_number(view, path, **check)
            elif key in _BOOL_KEYS:
                check_bool(view, path)
            elif key == "betas":
                betas = kwargs[key]
                if not isinstance(betas, (list, tuple)) or len(betas) != 2:
                    raise ConfigError(f"{path} must be a list of two numbers, got {betas!r}.")
                for i in range(2):
                    check_number(view, f"{path}.{i}", low=0, high=1, high_open=True)
        except ConfigError as err:
            raise ConfigError(str(err).replace(path, shown)) from None
    if spec.wraps:
        validate_optimizer(kwargs["base"], where=f"{where}.base", dry_build=False)
    if dry_build:
        _build([torch.nn.Parameter(torch.zeros(1))], cfg, where)
