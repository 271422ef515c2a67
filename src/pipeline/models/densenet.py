"""DenseNets: Huang et al. 2017, "Densely Connected Convolutional Networks" (arXiv:1608.06993).

Each layer of a dense block sees the concatenation of all earlier feature maps and adds
``growth_rate`` new ones. All presets are DenseNet-BC: layers are bottlenecks
(norm-act-1x1 conv to ``bn_size * growth_rate``, norm-act-3x3 conv) and transitions
(norm-act-1x1 conv-2x2 avg pool) keep ``compression`` of the channels.

* ``densenet121/169/201``: the ImageNet layout (Table 1; growth 32, 64-channel 7x7/2 stem +
  max pool, 4 blocks); parameter counts equal torchvision's.
* ``densenet_bc``: the CIFAR layout (section 3): a 3x3 stem with ``2 * growth_rate``
  channels, 3 blocks of (depth - 4) / 6 layers. DenseNet-BC-100, k = 12 has 0.8M parameters.

``pooling`` sets the transitions' 2x2/2 average pools and ``stem_pooling`` (ImageNet layout
only) the stem's 3x3/2 pad-1 max pool: each a pool type, or a mapping such as ``{name: max,
kernel_size: 3, stride: 2, padding: 1}`` that also overrides the geometry.

``conv_dropout`` is Dropout2d on each layer's new maps (the paper's drop rate, used without
augmentation, was 0.2 after each conv). ``batch_norm=False`` makes every norm Identity;
these deep, norm-first nets train badly without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.layers import PoolSpec, check_min_size, make_pool, probe
from pipeline.models.registry import register_model
from pipeline.models.resnet import Activation, Network, Ops, dropout2d, make_stem


class DenseLayer(nn.Module):
    """Bottleneck layer whose output is its input with ``growth_rate`` new channels appended."""

    def __init__(self, ops: Ops, cin: int, growth_rate: int, bn_size: int, drop: float) -> None:
        super().__init__()
        mid = bn_size * growth_rate
        self.body = nn.Sequential(
            ops.norm(cin), ops.act(cin), ops.conv(cin, mid, 1),
            ops.norm(mid), ops.act(mid), ops.conv(mid, growth_rate, 3),
            dropout2d(drop),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


def densenet(
    arch: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int | Sequence[int],
    blocks: Sequence[int],
    growth_rate: int,
    stem: str,
    stem_width: int,
    compression: float = 0.5,
    bn_size: int = 4,
    activation: Activation = "relu",
    batch_norm: bool = True,
    dropout: float = 0.0,
    conv_dropout: float = 0.0,
    pooling: PoolSpec = "avg",
    stem_pooling: PoolSpec = "max",
) -> Network:
    """The family: stem, then ``blocks[i]`` dense layers per block, transitions in between.

    Transitions pool with ``make_pool(pooling, 2, 2)``; the ImageNet stem with
    ``make_pool(stem_pooling, 3, 2, 1)`` (the CIFAR stem has no pool).
    """
    if isinstance(compression, bool) or not isinstance(compression, (int, float)) \
            or not 0 < compression <= 1:
        raise ConfigError(f"{arch}: compression must be in (0, 1], got {compression!r}.")
    # Every default transition halves the map (a 2x2/2 pool, which fails on a 1-px map); so
    # does the stem. Other pool geometries are checked by a dry run once the net is built.
    min_size = (4 if stem == "imagenet" else 1) * 2 ** (len(blocks) - 1)
    check_min_size(arch, image_size, min_size, f"its stem and {len(blocks) - 1} transitions "
                   "downsample that much")
    ops = Ops(activation, batch_norm)
    # Pre-activation layers throughout, so the CIFAR stem is a bare conv (as in the paper).
    stages, channels = [], stem_width
    for i, n in enumerate(blocks):
        layers = [DenseLayer(ops, channels + j * growth_rate, growth_rate, bn_size, conv_dropout)
                  for j in range(n)]
        channels += n * growth_rate
        if i < len(blocks) - 1:
            out = max(1, int(channels * compression))
            layers.append(nn.Sequential(ops.norm(channels), ops.act(channels),
                                        ops.conv(channels, out, 1), make_pool(pooling, 2, 2)))
            channels = out
        stages.append(nn.Sequential(*layers))
    if len(blocks) == 1:
        make_pool(pooling, 2, 2)  # no transition to build, but still reject a bad spec
    final = nn.Sequential(ops.norm(channels), ops.act(channels))
    model = Network(make_stem(ops, stem, in_channels, stem_width, preact=True,
                              pooling=stem_pooling, pool_key="model.stem_pooling"),
                    nn.Sequential(*stages), final, channels, num_classes, dropout)
    if isinstance(pooling, Mapping) or (stem == "imagenet" and isinstance(stem_pooling, Mapping)):
        probe(model, in_channels, image_size, arch,
              {"model.pooling": pooling, "model.stem_pooling": stem_pooling})
    return model


def _imagenet(name: str, blocks: tuple[int, ...]):
    def build(*, in_channels: int, num_classes: int, image_size: int | tuple[int, int],
              activation: Activation = "relu", batch_norm: bool = True, dropout: float = 0.0,
              conv_dropout: float = 0.0, pooling: PoolSpec = "avg",
              stem_pooling: PoolSpec = "max") -> nn.Module:
        return densenet(name, in_channels=in_channels, num_classes=num_classes,
                        image_size=image_size, blocks=blocks, growth_rate=32, stem="imagenet",
                        stem_width=64, activation=activation, batch_norm=batch_norm,
                        dropout=dropout, conv_dropout=conv_dropout, pooling=pooling,
                        stem_pooling=stem_pooling)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{name}: ImageNet DenseNet-BC, k = 32, blocks {list(blocks)} "
                     "(Huang et al. 2017, Table 1). Needs 32 px. ``pooling``: the transitions' "
                     "2x2/2 avg pools; ``stem_pooling``: the stem's 3x3/2 max pool.")
    return register_model(name, min_image_size=32)(build)


densenet121 = _imagenet("densenet121", (6, 12, 24, 16))
densenet169 = _imagenet("densenet169", (6, 12, 32, 32))
densenet201 = _imagenet("densenet201", (6, 12, 48, 32))


@register_model("densenet_bc", min_image_size=4)
def densenet_bc(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int | tuple[int, int],
    activation: Activation = "relu",
    batch_norm: bool = True,
    dropout: float = 0.0,
    conv_dropout: float = 0.0,
    growth_rate: int = 12,
    depth: int = 100,
    compression: float = 0.5,
    pooling: PoolSpec = "avg",
) -> nn.Module:
    """CIFAR DenseNet-BC (Huang et al. 2017, section 3); defaults are DenseNet-BC-100, k = 12.

    ``depth`` counts the stem, the 2 convs of every dense layer, the transitions and the
    classifier, so it must be 6n + 4 (40, 100, 190, ...) for 3 blocks of n layers.
    ``pooling`` sets the two transitions' 2x2/2 average pools (type, or a mapping).
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"densenet_bc depth must be 6n + 4 with n >= 1 (e.g. 40, 100, 190), "
                          f"so that (depth - 4) % 6 == 0; got {depth!r}.")
    if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate < 1:
        raise ConfigError(f"densenet_bc growth_rate must be a positive int, got {growth_rate!r}.")
    n = (depth - 4) // 6
    return densenet("densenet_bc", in_channels=in_channels, num_classes=num_classes,
                    image_size=image_size, blocks=(n, n, n), growth_rate=growth_rate,
                    stem="cifar", stem_width=2 * growth_rate, compression=compression,
                    activation=activation, batch_norm=batch_norm, dropout=dropout,
                    conv_dropout=conv_dropout, pooling=pooling)
