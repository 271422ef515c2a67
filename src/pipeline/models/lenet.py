"""LeNet-5 (LeCun et al., 1998), adapted to any input of at least 8x8 pixels.

Departures from the paper, as in common re-implementations: C3 connects to all S2 maps
(the paper used a sparse table), S2/S4 are plain pools (the paper's had a trainable
coefficient and bias), and the output is a Linear layer rather than RBF units.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

from pipeline.models.layers import (
    PoolSpec,
    check_min_size,
    make_activation,
    make_dropout,
    make_norm,
    make_pool,
    pair,
    pool_output_size,
    probe,
)
from pipeline.models.registry import register_model

MIN_SIZE = 8  # with the default 2x2/2 pools


def _paddings(size: int, pool: nn.Module, axis: int) -> tuple[int, int]:
    """(C1 pad, C3 pad) along one spatial axis, given the S2/S4 pool.

    C1 is padded below 32 px so 28-px MNIST gets the classic 14-px S2 map (the common
    variant); C3 is padded only when its unpadded S4 map would vanish (e.g. at 8-10 px
    with the default 2x2/2 pools).
    """
    pad1 = 0 if size >= 32 else 2
    s2 = pool_output_size(size + 2 * pad1 - 4, pool, axis)
    pad3 = 0 if pool_output_size(s2 - 4, pool, axis) >= 1 else 2
    return pad1, pad3


@register_model("lenet5", min_image_size=MIN_SIZE)
def lenet5(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int | tuple[int, int],
    activation: str = "tanh",
    pooling: PoolSpec = "avg",
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Module:
    """C1 6@5x5 → S2 → C3 16@5x5 → S4 → C5 120 → F6 84 → output.

    C5 is a Linear over the remaining 16 x s x s map; at 32 px that is the paper's 5x5
    conv on a 5x5 map. ``dropout`` applies before F6 and the output; ``batch_norm``
    goes between each conv and its activation. S2/S4 are 2x2/2 pools of type
    ``pooling``, or e.g. ``{name: max, kernel_size: 3, stride: 2, padding: 1}``.
    """
    check_min_size("lenet5", image_size, MIN_SIZE, hint="resize the images or use the 'mlp' model")
    h, w = pair(image_size)
    s2, s4 = make_pool(pooling, 2, 2), make_pool(pooling, 2, 2)
    (p1h, p3h), (p1w, p3w) = _paddings(h, s2, 0), _paddings(w, s2, 1)

    def conv_block(tag: str, cin: int, cout: int, pad: tuple[int, int]) -> list:
        return [
            (tag, nn.Conv2d(cin, cout, 5, padding=pad)),
            (f"{tag}_norm", make_norm(batch_norm, cout)),
            (f"{tag}_act", make_activation(activation, channels=cout)),
        ]

    # Named layers mirror the paper's C/S/F labels, which keeps printouts readable.
    features = [
        *conv_block("c1", in_channels, 6, (p1h, p1w)),
        ("s2", s2),
        *conv_block("c3", 6, 16, (p3h, p3w)),
        ("s4", s4),
    ]
    # C5's input size from a dry run on the meta device (ConfigError if the map vanishes).
    shape = probe(nn.Sequential(OrderedDict(features)), in_channels, (h, w), "lenet5",
                  {"model.pooling": pooling})
    layers = [
        *features,
        ("flatten", nn.Flatten()),
        ("c5", nn.Linear(math.prod(shape[1:]), 120)),
        ("c5_act", make_activation(activation, channels=120, dim=1)),
        ("c5_drop", make_dropout(dropout)),
        ("f6", nn.Linear(120, 84)),
        ("f6_act", make_activation(activation, channels=84, dim=1)),
        ("f6_drop", make_dropout(dropout)),
        ("output", nn.Linear(84, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))
