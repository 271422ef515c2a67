"""Layers chosen by name through small tables, so configs can pick them by string.

Adding a choice is one dict entry; error messages list the table keys, so they never go stale.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from pipeline.errors import ConfigError

ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,  # negative_slope=0.01
    "elu": nn.ELU,  # alpha=1.0
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "prelu": nn.PReLU,  # learnable slope, so it has parameters
}



class Maxout(nn.Module):
    """Maxout (Goodfellow et al. 2013) as a drop-in activation: a learned 1x1 map to
    ``pieces`` candidates per channel, then the max. Channel count is unchanged, so it can
    stand wherever ReLU does; it adds ``channels * channels * pieces`` weights."""

    def __init__(self, channels: int, pieces: int = 2, dim: int = 2) -> None:
        super().__init__()
        if isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 2:
            raise ConfigError(f"maxout needs an integer pieces >= 2, got {pieces!r}.")
        if channels is None:
            raise ConfigError("maxout needs to know its channel count; this layer cannot use maxout.")
        self.pieces, self.dim = pieces, dim
        self.proj = nn.Conv2d(channels, channels * pieces, 1) if dim == 2 else nn.Linear(channels, channels * pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if self.dim == 2:
            n, _, h, w = y.shape
            return y.view(n, -1, self.pieces, h, w).amax(dim=2)
        return y.view(*y.shape[:-1], -1, self.pieces).amax(dim=-1)


# Activations whose constructor needs the channel count and dimensionality.
SHAPED_ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {"maxout": Maxout}

POOLS: dict[str, Callable[..., nn.Module]] = {
    "max": nn.MaxPool2d,
    "avg": nn.AvgPool2d,
}

# Indexed by (name, dim); disabled norms are Identity so callers need no branches.
NORMS: dict[tuple[str, int], Callable[[int], nn.Module]] = {
    ("batch", 1): nn.BatchNorm1d,
    ("batch", 2): nn.BatchNorm2d,
    ("none", 1): lambda channels: nn.Identity(),
    ("none", 2): lambda channels: nn.Identity(),
}
# Configs commonly say batch_norm: true/false/null; map those onto table names.
_NORM_ALIASES: dict[object, str] = {True: "batch", False: "none", None: "none"}


def _lookup(table: dict, name: object, what: str) -> Callable[..., nn.Module]:
    key = name.lower() if isinstance(name, str) else None  # also rejects unhashable values
    if key not in table:
        choices = ", ".join(sorted(str(k) for k in table))
        raise ConfigError(f"Unknown {what} {name!r}; choose one of: {choices}.")
    return table[key]


def _build(ctor: Callable[..., nn.Module], what: str, name: object, **kw) -> nn.Module:
    # Constructors raise TypeError/ValueError on bad options; re-raise as a config problem.
    try:
        return ctor(**kw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Bad options {kw} for {what} {name!r}: {exc}") from exc


def make_activation(spec: str | Mapping, channels: int | None = None, dim: int = 2, **kw) -> nn.Module:
    """Build an activation from a name or a mapping ``{name: ..., **options}``.

    ``make_activation("leaky_relu", negative_slope=0.2)`` and
    ``make_activation({"name": "maxout", "pieces": 3}, channels=64)`` both work, so a
    config can say ``activation: elu`` or ``activation: {name: elu, alpha: 0.5}``.
    ``channels``/``dim`` describe the tensor it acts on (needed by maxout only).
    """
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        kw = {**options, **kw}
    else:
        name = spec
    key = name.lower() if isinstance(name, str) else None
    if key in SHAPED_ACTIVATIONS:
        return _build(SHAPED_ACTIVATIONS[key], "activation", name, channels=channels, dim=dim, **kw)
    table = {**ACTIVATIONS, **SHAPED_ACTIVATIONS}
    ctor = _lookup(table, name, "activation")
    return _build(ctor, "activation", name, **kw)


def make_pool(
    name: str, kernel_size: int = 2, stride: int | None = None, padding: int = 0
) -> nn.Module:
    """Build a 2-d pooling layer by name (see ``POOLS``); stride defaults to kernel_size."""
    ctor = _lookup(POOLS, name, "pooling")
    return _build(ctor, "pooling", name, kernel_size=kernel_size, stride=stride, padding=padding)


def make_norm(name_or_bool: str | bool | None, channels: int, dim: int = 2) -> nn.Module:
    """Build a norm layer: "batch"/True → BatchNorm{dim}d, None/False/"none" → Identity."""
    aliased = isinstance(name_or_bool, bool) or name_or_bool is None
    name = _NORM_ALIASES[name_or_bool] if aliased else name_or_bool
    key = (name.lower(), dim) if isinstance(name, str) else None
    if key not in NORMS:
        choices = ", ".join(sorted({f"{n} (dim={d})" for n, d in NORMS}))
        raise ConfigError(
            f"Unknown norm {name_or_bool!r} for dim={dim}; choose one of: {choices}, true, false."
        )
    return NORMS[key](channels)


def make_dropout(p: float, name: str = "dropout") -> nn.Dropout:
    """Build ``nn.Dropout(p)``, rejecting p outside [0, 1) with a ConfigError naming ``name``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {p!r}.")
    return nn.Dropout(float(p))


def _is_pos_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def pair(image_size: int | Sequence[int], name: str = "image_size") -> tuple[int, int]:
    """Normalise an int or (height, width) to a validated ``(height, width)`` tuple."""
    if isinstance(image_size, int):
        hw: tuple = (image_size, image_size)
    elif isinstance(image_size, Sequence) and not isinstance(image_size, str):
        hw = tuple(image_size)
    else:
        hw = ()
    if len(hw) != 2 or not all(_is_pos_int(v) for v in hw):
        raise ConfigError(f"{name} must be a positive int or [height, width], got {image_size!r}.")
    return hw


def check_positive_ints(values: object, name: str) -> list[int]:
    """Return ``values`` (an int or a list of ints) as a list of positive ints, else ConfigError."""
    items = [values] if isinstance(values, int) else values
    if isinstance(items, str) or not isinstance(items, Sequence):
        items = [None]  # forces the error below
    if not all(_is_pos_int(v) for v in items):
        raise ConfigError(f"{name} must be a list of positive ints, got {values!r}.")
    return list(items)
