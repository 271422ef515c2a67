"""ResNeXt: Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural Networks"
(arXiv:1611.05431) -- ResNet bottlenecks whose 3x3 conv is split into ``cardinality`` groups
of ``base_width`` channels (at the first stage; doubling per stage), written "CxWd".

* ``resnext``: the general family. Its defaults are a CPU-trainable ResNeXt-29 (4x16d,
  about 3.2M parameters at 10 classes, ~0.5 GMACs per 32-px image); ``layers=[3, 4, 6, 3]``
  with ``stem=imagenet`` gives the ImageNet ResNeXt-50 layout.
* ``resnext50_32x4d``: ImageNet layout, parameter count equal to torchvision's.
* ``resnext29_8x64d`` / ``resnext29_16x64d``: the paper's CIFAR nets (section 5.3): a 3x3
  64-channel stem, then 3 stages of 3 bottlenecks with outputs 256-512-1024 (34.4M and
  68.1M parameters). They are heavy: ~5 and ~10 GMACs per 32-px image.

Units, ``preact``, ``pooling`` (the ImageNet stem's pool) and the other options behave as
in :mod:`pipeline.models.resnet`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.layers import PoolSpec
from pipeline.models.registry import register_model
from pipeline.models.resnet import Activation, resnet


def _positive(arch: str, what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{arch}: {what} must be a positive int, got {value!r}.")
    return value


def resnext_family(arch: str, *, cardinality: int, base_width: int, **kwargs) -> nn.Module:
    """ResNet bottleneck family with grouped 3x3 convs; ``kwargs`` go to :func:`resnet`."""
    return resnet(arch, block="bottleneck", stem_width=64, **kwargs,
                  groups=_positive(arch, "cardinality", cardinality),
                  base_width=_positive(arch, "base_width", base_width))


@register_model("resnext", min_image_size=4)
def resnext(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int | tuple[int, int],
    activation: Activation = "relu",
    batch_norm: bool = True,
    dropout: float = 0.0,
    conv_dropout: float = 0.0,
    preact: bool = False,
    cardinality: int = 4,
    base_width: int = 16,
    layers: Sequence[int] = (3, 3, 3),
    stem: str = "cifar",
    pooling: PoolSpec = "max",
) -> nn.Module:
    """ResNeXt with ``layers[i]`` bottlenecks in stage i (64 * 2**i planes, 4x expansion).

    Depth is ``3 * sum(layers) + 2`` (29 for the default [3, 3, 3]). The input must be at
    least the total downsampling: 2**(len(layers) - 1) px, times 4 with ``stem=imagenet``.
    ``pooling`` sets the ImageNet stem's 3x3/2 max pool (the CIFAR stem has no pool).
    """
    return resnext_family(
        "resnext", in_channels=in_channels, num_classes=num_classes, image_size=image_size,
        activation=activation, batch_norm=batch_norm, dropout=dropout,
        conv_dropout=conv_dropout, preact=preact, cardinality=cardinality,
        base_width=base_width, layers=layers, stem=stem, pooling=pooling,
    )


def _preset(name: str, cardinality: int, base_width: int, layers: tuple[int, ...], stem: str,
            min_size: int):
    def cifar(*, in_channels: int, num_classes: int, image_size: int | tuple[int, int],
              activation: Activation = "relu", batch_norm: bool = True, dropout: float = 0.0,
              conv_dropout: float = 0.0, preact: bool = False) -> nn.Module:
        return resnext_family(name, in_channels=in_channels, num_classes=num_classes,
                              image_size=image_size, activation=activation,
                              batch_norm=batch_norm, dropout=dropout, conv_dropout=conv_dropout,
                              preact=preact, cardinality=cardinality, base_width=base_width,
                              layers=layers, stem=stem)

    # Only the ImageNet stem pools, so only those presets take ``pooling``.
    def imagenet(*, in_channels: int, num_classes: int, image_size: int | tuple[int, int],
                 activation: Activation = "relu", batch_norm: bool = True, dropout: float = 0.0,
                 conv_dropout: float = 0.0, preact: bool = False,
                 pooling: PoolSpec = "max") -> nn.Module:
        return resnext_family(name, in_channels=in_channels, num_classes=num_classes,
                              image_size=image_size, activation=activation,
                              batch_norm=batch_norm, dropout=dropout, conv_dropout=conv_dropout,
                              preact=preact, cardinality=cardinality, base_width=base_width,
                              layers=layers, stem=stem, pooling=pooling)

    build = imagenet if stem == "imagenet" else cifar

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{name}: ResNeXt {cardinality}x{base_width}d, bottlenecks {list(layers)}, "
                     f"{stem} stem (Xie et al. 2017). Needs {min_size} px.")
    return register_model(name, min_image_size=min_size)(build)


resnext50_32x4d = _preset("resnext50_32x4d", 32, 4, (3, 4, 6, 3), "imagenet", 32)
resnext29_8x64d = _preset("resnext29_8x64d", 8, 64, (3, 3, 3), "cifar", 4)
resnext29_16x64d = _preset("resnext29_16x64d", 16, 64, (3, 3, 3), "cifar", 4)
