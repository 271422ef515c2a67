"""Model registry: builders register by name; configs create models by name.

Builder contract: ``fn(*, in_channels, num_classes, image_size, **typed_kwargs) -> nn.Module``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from pipeline.config import plain
from pipeline.errors import ConfigError
from pipeline.models.layers import pair

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}
# Smallest square input each design accepts (a builder given less raises ConfigError).
_MIN_SIZE: dict[str, int] = {}
# Supplied by create_model itself, so they are not "the model's own" kwargs.
_COMMON = ("in_channels", "num_classes", "image_size")


def register_model(name: str, *, min_image_size: int = 1) -> Callable[[Builder], Builder]:
    """Decorator registering a builder under ``name``; a duplicate name raises ValueError.

    ``min_image_size`` documents the smallest input the design takes (tests and
    `pipeline models` use it); the builder itself must raise ConfigError below it.
    """

    def decorator(fn: Builder) -> Builder:
        if name in _REGISTRY:
            # A silent overwrite would make create_model depend on import order.
            raise ValueError(f"Model {name!r} is already registered by {_REGISTRY[name]!r}.")
        _REGISTRY[name] = fn
        _MIN_SIZE[name] = min_image_size
        return fn

    return decorator


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def min_image_size(name: str) -> int:
    """The smallest square input (pixels) model ``name`` accepts."""
    _builder(name)
    return _MIN_SIZE[name]


def _builder(name: str) -> Builder:
    if name not in _REGISTRY:
        raise ConfigError(f"Unknown model {name!r}; choose one of: {', '.join(list_models())}.")
    return _REGISTRY[name]


def model_defaults(name: str) -> dict[str, Any]:
    """The builder's own keyword defaults (excluding in_channels/num_classes/image_size)."""
    params = inspect.signature(_builder(name)).parameters.values()
    return {
        p.name: plain(p.default)
        for p in params
        if p.name not in _COMMON and p.default is not inspect.Parameter.empty
    }


def _check_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    params = inspect.signature(_builder(name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the builder takes **kwargs and validates them itself
    accepted = sorted(k for k in params if k not in _COMMON)
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"Unknown argument {key!r} for model {name!r}; accepted: "
                f"{', '.join(accepted) or '(none)'}.{hint}"
            )


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive int, got {value!r}.")
    return value


def create_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int | tuple[int, int],
    **kwargs: Any,
) -> nn.Module:
    """Build registered model ``name``; None-valued kwargs are dropped so builder defaults hold.

    The result carries ``arch`` and ``arch_kwargs`` (all arguments, defaults filled in), so
    ``create_model(m.arch, **m.arch_kwargs)`` rebuilds the same architecture from a checkpoint.
    """
    builder = _builder(name)
    kwargs = {k: plain(v) for k, v in kwargs.items() if v is not None}
    _check_kwargs(name, kwargs)
    hw = pair(image_size)  # validate before any builder arithmetic
    common = {
        "in_channels": _check_count(in_channels, "in_channels"),
        "num_classes": _check_count(num_classes, "num_classes"),
        "image_size": image_size if isinstance(image_size, int) else list(hw),
    }
    model = builder(**common, **kwargs)
    model.arch = name
    model.arch_kwargs = {**common, **model_defaults(name), **kwargs}
    return model
