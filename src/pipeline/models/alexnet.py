"""AlexNet (Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep
Convolutional Neural Networks", NeurIPS 2012) and a small-input variant.

``alexnet`` is torchvision's single-tower version (itself the "one weird trick" layout of
Krizhevsky 2014: 64-192-384-256-256 channels, no LRN, no two-GPU grouping), with the same
module indices, so state_dict keys and parameter counts match ``torchvision.models.alexnet``.

``alexnet_small`` keeps the shape of the design (five convs, overlapping 3x3/2 pools after
conv 1, 2 and 5, a two-hidden-layer dropout classifier) but swaps the 11x11/4 stem for a
5x5/1 conv, pads the pools and ends in global average pooling, so 8..32-px images fit.

``pooling`` picks the pool type of the three 3x3/2 pools, or is a mapping such as
``{name: avg, kernel_size: 2, stride: 2}`` that also overrides their geometry (keys left
out keep the design's 3x3/2, padded 0 in ``alexnet`` and 1 in ``alexnet_small``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.layers import (
    PoolSpec,
    check_min_size,
    check_positive_ints,
    make_activation,
    make_dropout,
    make_norm,
    make_pool,
    probe,
)
from pipeline.models.registry import register_model

WIDTHS = (64, 192, 384, 256, 256)
PADDINGS = (2, 2, 1, 1, 1)  # conv1 pads 2 (not 5) in torchvision; the others keep the size
POOL_AFTER = (0, 1, 4)  # pools follow conv1, conv2 and conv5
# Smallest inputs. alexnet: 11x11/4 conv then three unpadded 3x3/2 pools, each needing a
# >= 3-px map (torchvision's own meta says 63). alexnet_small: its padded pools never
# produce an empty map, so we require each of the three to see >= 2 px (8 → 4 → 2 → 1).
MIN_SIZE = {"alexnet": 63, "alexnet_small": 8}


class AlexNet(nn.Module):
    """``features`` → ``avgpool`` → flatten → ``classifier``, as in torchvision."""

    def __init__(self, features: nn.Module, avgpool: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def _features(
    in_channels: int,
    widths: Sequence[int],
    *,
    first_kernel: int,
    first_stride: int,
    pool_padding: int,
    activation: str,
    batch_norm: bool,
    pooling: PoolSpec,
    conv_dropout: float,
) -> nn.Sequential:
    """Five convs (first_kernel, 5, 3, 3, 3) → [BN] → act, overlapping 3x3/2 pools.

    Disabled BN and zero conv_dropout add no modules, so indices match torchvision.
    """
    layers: list[nn.Module] = []
    kernels = (first_kernel, 5, 3, 3, 3)
    for i, (width, kernel, padding) in enumerate(zip(widths, kernels, PADDINGS)):
        stride = first_stride if i == 0 else 1
        layers.append(nn.Conv2d(in_channels, width, kernel, stride=stride, padding=padding))
        norm = make_norm(batch_norm, width)
        if not isinstance(norm, nn.Identity):
            layers.append(norm)
        layers.append(make_activation(activation, channels=width))
        if i in POOL_AFTER:
            # 3x3 windows with stride 2 overlap: the paper's "overlapping pooling" (§3.4).
            layers.append(make_pool(pooling, 3, 2, padding=pool_padding))
            if conv_dropout > 0:
                layers.append(make_dropout(conv_dropout, "conv_dropout"))
        in_channels = width
    return nn.Sequential(*layers)


def _classifier(
    in_features: int, hidden: int, num_classes: int, activation: str, dropout: float
) -> nn.Sequential:
    """Dropout → Linear → act → Dropout → Linear → act → Linear (torchvision's order)."""
    return nn.Sequential(
        make_dropout(dropout),
        nn.Linear(in_features, hidden),
        make_activation(activation, channels=hidden, dim=1),
        make_dropout(dropout),
        nn.Linear(hidden, hidden),
        make_activation(activation, channels=hidden, dim=1),
        nn.Linear(hidden, num_classes),
    )


def _check_size(name: str, image_size: int | tuple[int, int]) -> None:
    """The design's minimum (default pools); other pool geometries are probed after."""
    other = "alexnet_small" if name == "alexnet" else "mlp"
    check_min_size(name, image_size, MIN_SIZE[name],
                   hint=f"resize the images (data.resize) or use '{other}'")


def _check_pools(name: str, features: nn.Module, in_channels: int,
                 image_size: int | tuple[int, int], pooling: PoolSpec) -> None:
    if isinstance(pooling, Mapping):  # string pools keep the geometry _check_size covers
        probe(features, in_channels, image_size, name, {"model.pooling": pooling})


@register_model("alexnet", min_image_size=MIN_SIZE["alexnet"])
def alexnet(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int | tuple[int, int],
    activation: str = "relu",
    batch_norm: bool = False,
    dropout: float = 0.5,
    pooling: PoolSpec = "max",
    conv_dropout: float = 0.0,
) -> nn.Module:
    """AlexNet for >= 63-px inputs (224 in the paper): torchvision's layout.

    ``batch_norm`` (off by default, as torchvision) goes conv → BN → act and stands in for
    the paper's local response normalisation, which torchvision also drops. The
    AdaptiveAvgPool2d(6) makes the classifier (9216 → 4096 → 4096) size-independent.
    """
    _check_size("alexnet", image_size)
    features = _features(
        in_channels, WIDTHS, first_kernel=11, first_stride=4, pool_padding=0,
        activation=activation, batch_norm=batch_norm, pooling=pooling,
        conv_dropout=make_dropout(conv_dropout, "conv_dropout").p,
    )
    _check_pools("alexnet", features, in_channels, image_size, pooling)
    classifier = _classifier(WIDTHS[-1] * 6 * 6, 4096, num_classes, activation, dropout)
    return AlexNet(features, nn.AdaptiveAvgPool2d(6), classifier)


@register_model("alexnet_small", min_image_size=MIN_SIZE["alexnet_small"])
def alexnet_small(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int | tuple[int, int],
    activation: str = "relu",
    batch_norm: bool = True,
    dropout: float = 0.5,
    pooling: PoolSpec = "max",
    conv_dropout: float = 0.0,
    widths: Sequence[int] = (32, 96, 192, 128, 128),
    fc_size: int = 256,
) -> nn.Module:
    """AlexNet for 8..32-px images (CIFAR, MNIST): 5x5/1 stem, padded 3x3/2 pools, GAP head.

    ``widths`` defaults to AlexNet's 64-192-384-256-256 halved, ``fc_size`` replaces the
    4096-unit hidden layers. ``batch_norm`` is on by default because, trained from scratch
    without the paper's LRN, BN is what makes this depth train reliably on small data.
    A 32-px image gives 32 → 16 → 8 → 4-px maps; the head average-pools whatever remains.
    """
    _check_size("alexnet_small", image_size)
    widths = check_positive_ints(widths, "widths")
    if len(widths) != 5:
        raise ConfigError(f"alexnet_small needs 5 widths (one per conv), got {widths!r}.")
    fc_size = check_positive_ints(fc_size, "fc_size")[0]
    features = _features(
        in_channels, widths, first_kernel=5, first_stride=1, pool_padding=1,
        activation=activation, batch_norm=batch_norm, pooling=pooling,
        conv_dropout=make_dropout(conv_dropout, "conv_dropout").p,
    )
    _check_pools("alexnet_small", features, in_channels, image_size, pooling)
    classifier = _classifier(widths[-1], fc_size, num_classes, activation, dropout)
    return AlexNet(features, nn.AdaptiveAvgPool2d(1), classifier)
