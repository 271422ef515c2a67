"""Weight initialisation schemes, chosen by name, applied to conv and linear layers.

Norm layers keep weight 1 / bias 0 and biases start at zero under every scheme except
`default` (which leaves PyTorch's own per-layer initialisation untouched).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.errors import ConfigError

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _fan_in(w: torch.Tensor) -> int:
    return nn.init._calculate_fan_in_and_fan_out(w)[0]


def _uniform_fan_in(w: torch.Tensor, std: float) -> None:
    bound = 1.0 / _fan_in(w)
    nn.init.uniform_(w, -bound, bound)


# name -> fn(weight, std) initialising the weight in place.
INITS: dict[str, Callable[[torch.Tensor, float], None]] = {
    "xavier_uniform": lambda w, std: nn.init.xavier_uniform_(w),
    "xavier_normal": lambda w, std: nn.init.xavier_normal_(w),
    "kaiming_uniform": lambda w, std: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "kaiming_normal": lambda w, std: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"),
    "normal": lambda w, std: nn.init.normal_(w, 0.0, std),
    "uniform": _uniform_fan_in,  # U(-1/fan_in, 1/fan_in), LeCun-style
}


@torch.no_grad()
def _reinit(model: nn.Module, conv: Callable[[torch.Tensor], None],
            linear: Callable[[torch.Tensor], None]) -> nn.Module:
    """Apply ``conv``/``linear`` to those layers' weights; zero their biases, reset norms."""
    for module in model.modules():
        if isinstance(module, _LAYERS):
            (linear if isinstance(module, nn.Linear) else conv)(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def init_weights(model: nn.Module, scheme: str = "default", *, std: float = 0.01) -> nn.Module:
    """Re-initialise every conv/linear layer with `scheme`; `default` keeps PyTorch's."""
    if scheme == "default":
        return model
    if scheme not in INITS:
        raise ConfigError(f"init.scheme={scheme!r} is not one of: default, {', '.join(sorted(INITS))}.")
    if scheme == "normal" and not std > 0:
        raise ConfigError(f"init.std={std} must be > 0.")
    return _reinit(model, lambda w: INITS[scheme](w, std), lambda w: INITS[scheme](w, std))


def he_init(model: nn.Module) -> nn.Module:
    """torchvision's VGG init, which VGG and GoogLeNet builders apply to their fresh weights:
    He-normal (fan_out) convs, N(0, 0.01) linears.

    PyTorch's default init shrinks activations layer by layer, which stalls deep nets
    without BN trained from scratch; He init keeps their scale. Unlike `init_weights`
    (the user's `init.scheme`, applied after building), this is part of the architecture.
    """
    return _reinit(model, conv=lambda w: INITS["kaiming_normal"](w, 0.0),
                   linear=lambda w: INITS["normal"](w, 0.01))
