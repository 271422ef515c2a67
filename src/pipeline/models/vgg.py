"""VGG family: a torchvision-style ``make_layers`` (cfg list → features) plus builders.

A cfg is a list of ints (3x3 conv with that many output channels) and "M" (2x2 pool),
e.g. MiniVGG is ``[32, 32, "M", 64, 64, "M"]``; VGG-11..19 are longer lists.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.layers import (
    check_positive_ints,
    make_activation,
    make_dropout,
    make_norm,
    make_pool,
    pair,
)
from pipeline.models.registry import register_model

Cfg = Sequence[int | str]


def make_layers(
    cfg: Cfg,
    in_channels: int,
    *,
    activation: str = "relu",
    pooling: str = "max",
    batch_norm: bool = False,
    norm_after_activation: bool = False,
    pool_dropout: float = 0.0,
) -> nn.Sequential:
    """Feature extractor from a cfg list: int → conv3x3 pad 1, "M" → 2x2 pool.

    Convs are conv → BN → act (torchvision VGG-BN) or, with ``norm_after_activation``,
    conv → act → BN (MiniVGG). ``pool_dropout > 0`` adds Dropout after each pool.
    Disabled BN/dropout add no modules, so layer indices match torchvision's VGG.
    """
    layers: list[nn.Module] = []
    for item in cfg:
        if item == "M":
            layers.append(make_pool(pooling, 2))
            if pool_dropout > 0:
                layers.append(make_dropout(pool_dropout, "conv_dropout"))
            continue
        conv = nn.Conv2d(in_channels, item, 3, padding=1)
        act, norm = make_activation(activation, channels=item), make_norm(batch_norm, item)
        block = [conv, act, norm] if norm_after_activation else [conv, norm, act]
        layers += [m for m in block if not isinstance(m, nn.Identity)]
        in_channels = item
    return nn.Sequential(*layers)


def check_poolable(cfg: Cfg, image_size: int | tuple[int, int], arch: str) -> tuple[int, int]:
    """Spatial size after the cfg's pools; ConfigError if any pool would see < 2 px."""
    h, w = pair(image_size)
    pools = sum(1 for item in cfg if item == "M")
    if min(h, w) < 2**pools:
        raise ConfigError(
            f"{arch} halves the image {pools} times, so it needs image_size >= {2**pools}, "
            f"got {image_size!r}; use fewer stages (widths) or larger images."
        )
    return h >> pools, w >> pools


class VGG(nn.Module):
    """``features`` → flatten → ``classifier``, as in torchvision (minus the adaptive pool)."""

    def __init__(self, features: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


@register_model("minivgg", min_image_size=4)
def minivgg(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int | tuple[int, int],
    widths: Sequence[int] = (32, 64),
    fc_size: int = 512,
    activation: str = "relu",
    pooling: str = "max",
    batch_norm: bool = True,
    dropout: float = 0.5,
    conv_dropout: float = 0.25,
) -> nn.Module:
    """MiniVGG (Rosebrock, for CIFAR): per width two conv-act-BN, pool, Dropout; then FC.

    Classifier: Linear(fc_size) → act → BatchNorm1d → Dropout(dropout) → Linear(num_classes).
    """
    widths = check_positive_ints(widths, "widths")
    if not widths:
        raise ConfigError("minivgg needs at least one entry in widths, e.g. [32, 64].")
    fc_size = check_positive_ints(fc_size, "fc_size")[0]
    cfg: list[int | str] = [item for w in widths for item in (w, w, "M")]
    fh, fw = check_poolable(cfg, image_size, "minivgg")
    features = make_layers(
        cfg,
        in_channels,
        activation=activation,
        pooling=pooling,
        batch_norm=batch_norm,
        norm_after_activation=True,
        pool_dropout=make_dropout(conv_dropout, "conv_dropout").p,  # validate range
    )
    classifier = nn.Sequential(
        nn.Linear(widths[-1] * fh * fw, fc_size),
        make_activation(activation, channels=fc_size, dim=1),
        make_norm(batch_norm, fc_size, dim=1),
        make_dropout(dropout),
        nn.Linear(fc_size, num_classes),
    )
    return VGG(features, classifier)
