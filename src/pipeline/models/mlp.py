"""Multi-layer perceptron baseline: flattens the image, no spatial structure."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import nn

from pipeline.models.layers import (
    check_positive_ints,
    make_activation,
    make_dropout,
    make_norm,
    pair,
)
from pipeline.models.registry import register_model


@register_model("mlp")
def mlp(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int | tuple[int, int],
    hidden_sizes: Sequence[int] = (256, 128),
    activation: str = "relu",
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Module:
    """Flatten → [Linear → BatchNorm1d? → activation → Dropout] per hidden size → Linear.

    An empty ``hidden_sizes`` gives multinomial logistic regression.
    """
    h, w = pair(image_size)
    width = in_channels * h * w
    layers: list[nn.Module] = [nn.Flatten()]
    for size in check_positive_ints(hidden_sizes, "hidden_sizes"):
        layers += [
            nn.Linear(width, size),
            make_norm(batch_norm, size, dim=1),
            make_activation(activation, channels=size, dim=1),
            make_dropout(dropout),
        ]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


# The MLP with one hidden layer of 32: the cheap end of accuracy against cost (conf/tune/pareto.yaml).
mlp_narrow = register_model("mlp_narrow")(functools.partial(mlp, hidden_sizes=(32,)))
