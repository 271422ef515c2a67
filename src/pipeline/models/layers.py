"""Layers chosen by name through small tables, so configs can pick them by string.

Adding a choice is one dict entry; error messages list the table keys, so they never go stale.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

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


def choose(value: object, choices: Collection[str], what: str) -> str:
    """``value`` lower-cased if it is one of ``choices``, else a ConfigError listing them."""
    key = value.lower() if isinstance(value, str) else None  # also rejects unhashable values
    if key not in choices:
        listed = ", ".join(sorted(str(c) for c in choices))
        raise ConfigError(f"Unknown {what} {value!r}; choose one of: {listed}.")
    return key


def _lookup(table: dict, name: object, what: str) -> Callable[..., nn.Module]:
    return table[choose(name, table, what)]


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


# What a ``pooling`` mapping may set besides ``name``: option → (check, what it must be).
# Keys left out keep the design's own value for that pool (see ``make_pool``).
POOL_OPTIONS: dict[str, tuple[Callable[[object], bool], str]] = {
    "kernel_size": (lambda v: _is_int_or_pair(v, 1), "a positive int or [height, width]"),
    "stride": (
        lambda v: v is None or _is_int_or_pair(v, 1),
        "a positive int or [height, width] (null: same as kernel_size)",
    ),
    "padding": (lambda v: _is_int_or_pair(v, 0), "a non-negative int or [height, width]"),
    "ceil_mode": (lambda v: isinstance(v, bool), "true or false"),
}

PoolSpec = str | Mapping  # "max", or {name: max, kernel_size: 3, stride: 2, padding: 1}


def _is_int_or_pair(value: object, least: int) -> bool:
    def ok(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    if isinstance(value, Sequence) and not isinstance(value, str):
        return len(value) == 2 and all(ok(v) for v in value)
    return ok(value)


def _as_pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def pool_name(spec: PoolSpec) -> object:
    """The pool type a ``pooling`` spec names (``"max"`` for ``{name: max, ...}``)."""
    return spec.get("name") if isinstance(spec, Mapping) else spec


def make_pool(
    spec: PoolSpec,
    kernel_size: int = 2,
    stride: int | None = None,
    padding: int = 0,
    *,
    ceil_mode: bool = False,
    key: str = "model.pooling",
) -> nn.Module:
    """Build a 2-d pooling layer from a name (see ``POOLS``) or a mapping.

    ``kernel_size``/``stride``/``padding``/``ceil_mode`` are the design's values for this
    pool (stride None means kernel_size). A string spec only picks the type, so
    ``make_pool("avg", 3, 2)`` is a 3x3/2 average pool; a mapping such as
    ``{name: max, kernel_size: 3, stride: 2, padding: 1}`` also overrides any of the
    ``POOL_OPTIONS`` it names and keeps the design's value for the rest. Errors are
    ConfigErrors naming ``key`` (the config entry the spec came from).
    """
    options = {"kernel_size": kernel_size, "stride": stride, "padding": padding,
               "ceil_mode": ceil_mode}
    if isinstance(spec, Mapping):
        overrides = dict(spec)
        name = overrides.pop("name", None)
        if name is None:
            raise ConfigError(f"{key} needs a name (one of: {', '.join(sorted(POOLS))}), "
                              f"got {dict(spec)!r}.")
        for option, value in overrides.items():
            if option not in POOL_OPTIONS:
                raise ConfigError(f"{key}: unknown option {option!r}; a pooling mapping takes "
                                  f"name, {', '.join(POOL_OPTIONS)}.")
            check, expected = POOL_OPTIONS[option]
            if not check(value):
                raise ConfigError(f"{key}.{option} must be {expected}, got {value!r}.")
        options.update(overrides)
    else:
        name = spec
    ctor = _lookup(POOLS, name, key)
    for option in ("kernel_size", "stride", "padding"):
        if options[option] is not None and not isinstance(options[option], int):
            options[option] = _as_pair(options[option])
    kernel, pad = _as_pair(options["kernel_size"]), _as_pair(options["padding"])
    if any(p > k // 2 for p, k in zip(pad, kernel)):
        raise ConfigError(f"{key}: padding {options['padding']!r} must be at most half of "
                          f"kernel_size {options['kernel_size']!r}.")
    return _build(ctor, key, name, **options)


def pool_output_size(size: int, pool: nn.Module, axis: int = 0) -> int:
    """Side length after ``pool`` (a MaxPool2d/AvgPool2d) along ``axis`` (0: height,
    1: width), by PyTorch's formula; 0 where PyTorch would reject the input as too small."""
    if size < 1:
        return 0
    k, s, p = (_as_pair(getattr(pool, a))[axis] for a in ("kernel_size", "stride", "padding"))
    out = (size + 2 * p - k + (s - 1 if pool.ceil_mode else 0)) // s + 1
    if pool.ceil_mode and (out - 1) * s >= size + p:
        out -= 1  # the last window may not start in the padding
    return max(out, 0)


# A forward pass of one image costs at most parameters x pixels multiply-adds (a weight is
# used at most once per input position). Below this bound it takes milliseconds on the CPU,
# less than the meta device's first use in a process: about a second, spent importing and
# running PyTorch's Python shape rules (every stage validates its model before it starts).
CPU_PROBE_MACS = 5e8


def probe(
    module: nn.Module,
    in_channels: int,
    image_size: int | Sequence[int],
    arch: str,
    settings: Mapping[str, object] | None = None,
) -> torch.Size:
    """Output shape of ``module`` on one zeros image, with zeros for its weights.

    A large model runs on the ``meta`` device: meta tensors carry shapes only, so that costs
    no compute or memory whatever the model's size. A small one (``CPU_PROBE_MACS``) runs on
    the CPU, in no time, even inside a ``torch.device("meta")`` block (the config check
    builds there). Either way the module's own weights are untouched. Runs in eval mode
    (each module's training flag is restored). A layer whose input has shrunk below its
    window, or an empty output, raises a ConfigError naming ``arch``, the input size and
    ``settings`` (the config entries that shaped the net, e.g. ``{"model.pooling": spec}``).
    """
    h, w = pair(image_size)
    named = [*module.named_parameters(), *module.named_buffers()]
    device = "cpu" if sum(t.numel() for _, t in named) * h * w <= CPU_PROBE_MACS else "meta"
    ref = next(module.parameters(), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    modes = {m: m.training for m in module.modules()}
    detail = ""
    try:
        module.eval()
        # The device block also holds for tensors the forward pass makes itself.
        with torch.no_grad(), torch.device(device):
            tensors = {n: torch.zeros_like(t, device=device) for n, t in named}
            x = torch.zeros(1, in_channels, h, w, device=device, dtype=dtype)
            out = torch.func.functional_call(module, tensors, (x,))
    except RuntimeError as exc:
        out, detail = None, f" ({str(exc).splitlines()[0]})"
    finally:
        for m, training in modes.items():
            m.training = training
    if out is None or out.numel() == 0:
        used = ", ".join(f"{k}={v!r}" for k, v in (settings or {}).items())
        raise ConfigError(
            f"{arch}{' with ' + used if used else ''} shrinks the {h}x{w} input to an empty "
            f"feature map{detail}; use a larger image_size, or pooling with a smaller "
            "kernel_size/stride or more padding."
        )
    return out.shape


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


def check_min_size(arch: str, image_size: int | Sequence[int], min_size: int, why: str = "",
                   hint: str = "resize the images or pick a model for smaller inputs") -> None:
    """ConfigError naming ``arch``, ``min_size`` and (if given) ``why`` below that size."""
    if min(pair(image_size)) < min_size:
        because = f" ({why})" if why else ""
        raise ConfigError(
            f"{arch} needs image_size >= {min_size}{because}, got {image_size!r}; {hint}.")


def check_positive_ints(values: object, name: str) -> list[int]:
    """Return ``values`` (an int or a list of ints) as a list of positive ints, else ConfigError."""
    items = [values] if isinstance(values, int) else values
    if isinstance(items, str) or not isinstance(items, Sequence):
        items = [None]  # forces the error below
    if not all(_is_pos_int(v) for v in items):
        raise ConfigError(f"{name} must be a list of positive ints, got {values!r}.")
    return list(items)
