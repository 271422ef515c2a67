"""VGG family: a torchvision-style ``make_layers`` (cfg list → features) plus builders.

A cfg is a list of ints (3x3 conv with that many output channels) and "M" (a pool, 2x2/2
unless ``pooling`` is a mapping such as ``{name: max, kernel_size: 3, stride: 2, padding: 1}``),
e.g. MiniVGG is ``[32, 32, "M", 64, 64, "M"]``; VGG-11..19 are longer lists.

VGG-11/13/16/19 (+ ``_bn``) are configurations A/B/D/E of Simonyan & Zisserman, "Very Deep
Convolutional Networks for Large-Scale Image Recognition" (ICLR 2015), laid out as
torchvision's ``vgg11``..``vgg19_bn``: same module indices, so the state_dict keys match.
Each is a tiny builder over the family function :func:`vgg`, made by ``_vgg``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.init import he_init
from pipeline.models.layers import (
    PoolSpec,
    check_min_size,
    check_positive_ints,
    choose,
    make_activation,
    make_dropout,
    make_norm,
    make_pool,
    probe,
)
from pipeline.models.registry import register_model

Cfg = Sequence[int | str]


def make_layers(
    cfg: Cfg,
    in_channels: int,
    *,
    activation: str = "relu",
    pooling: PoolSpec = "max",
    batch_norm: bool = False,
    norm_after_activation: bool = False,
    pool_dropout: float = 0.0,
) -> nn.Sequential:
    """Feature extractor from a cfg list: int → conv3x3 pad 1, "M" → 2x2/2 pool.

    ``pooling`` names the pool type, or is a mapping overriding the 2x2/2 geometry too.

    Convs are conv → BN → act (torchvision VGG-BN) or, with ``norm_after_activation``,
    conv → act → BN (MiniVGG). ``pool_dropout > 0`` adds Dropout after each pool.
    Disabled BN/dropout add no modules, so layer indices match torchvision's VGG.
    """
    pool_dropout = make_dropout(pool_dropout, "conv_dropout").p  # a negative p must not pass as 0
    layers: list[nn.Module] = []
    for item in cfg:
        if item == "M":
            layers.append(make_pool(pooling, 2, 2))
            if pool_dropout > 0:
                layers.append(make_dropout(pool_dropout, "conv_dropout"))
            continue
        conv = nn.Conv2d(in_channels, item, 3, padding=1)
        act, norm = make_activation(activation, channels=item), make_norm(batch_norm, item)
        block = [conv, act, norm] if norm_after_activation else [conv, norm, act]
        layers += [m for m in block if not isinstance(m, nn.Identity)]
        in_channels = item
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """``features`` → ``avgpool`` → flatten → ``classifier``, as in torchvision.

    ``avgpool`` defaults to Identity (MiniVGG flattens its map directly); it has no
    parameters either way, so state_dict keys do not depend on it.
    """

    def __init__(
        self, features: nn.Module, classifier: nn.Module, avgpool: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = avgpool if avgpool is not None else nn.Identity()
        self.classifier = classifier

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_model("minivgg", min_image_size=4)
def minivgg(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int | tuple[int, int],
    widths: Sequence[int] = (32, 64),
    fc_size: int = 512,
    activation: str = "relu",
    pooling: PoolSpec = "max",
    batch_norm: bool = True,
    dropout: float = 0.5,
    conv_dropout: float = 0.25,
) -> nn.Module:
    """MiniVGG (Rosebrock, for CIFAR): per width two conv-act-BN, pool, Dropout; then FC.

    Classifier: Linear(fc_size) → act → BatchNorm1d → Dropout(dropout) → Linear(num_classes),
    the first Linear sized by a (meta-device) dry run of the features.
    """
    widths = check_positive_ints(widths, "widths")
    if not widths:
        raise ConfigError("minivgg needs at least one entry in widths, e.g. [32, 64].")
    fc_size = check_positive_ints(fc_size, "fc_size")[0]
    # The design's minimum, for its default 2x2/2 pools; other geometries are probed below.
    pools = len(widths)
    check_min_size("minivgg", image_size, 2**pools, f"it halves the image {pools} times",
                   "use fewer stages (widths) or larger images")
    cfg: list[int | str] = [item for w in widths for item in (w, w, "M")]
    features = make_layers(cfg, in_channels, activation=activation, pooling=pooling,
                           batch_norm=batch_norm, pool_dropout=conv_dropout,
                           norm_after_activation=True)
    shape = probe(features, in_channels, image_size, "minivgg", {"model.pooling": pooling})
    classifier = nn.Sequential(
        nn.Linear(math.prod(shape[1:]), fc_size),
        make_activation(activation, channels=fc_size, dim=1),
        make_norm(batch_norm, fc_size, dim=1),
        make_dropout(dropout),
        nn.Linear(fc_size, num_classes),
    )
    return VGG(features, classifier)


# MiniVGG at a quarter of its widths (8 and 16 channels, a 64-unit head): accuracy against
# cost (conf/tune/pareto.yaml).
minivgg_narrow = register_model("minivgg_narrow", min_image_size=4)(
    functools.partial(minivgg, widths=(8, 16), fc_size=64))


# --- VGG-11..19 (Simonyan & Zisserman 2015, Table 1) -------------------------------------

CFGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", *[256] * 3, "M", *[512] * 3, "M", *[512] * 3, "M"],
    "E": [64, 64, "M", 128, 128, "M", *[256] * 4, "M", *[512] * 4, "M", *[512] * 4, "M"],
}
VGG_MIN_SIZE = 32  # five 2x2/2 pools: 32 px ends as a 1x1 map, anything less as 0x0
HEADS = ("imagenet", "small")


def vgg(
    name: str,
    cfg: Cfg,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int | tuple[int, int],
    activation: str,
    batch_norm: bool,
    dropout: float,
    pooling: PoolSpec,
    head: str,
    conv_dropout: float,
) -> nn.Module:
    """Family function behind ``vgg11``..``vgg19_bn``.

    ``head="imagenet"``: torchvision's AdaptiveAvgPool2d(7) → Linear(25088, 4096) → act →
    Dropout → Linear(4096, 4096) → act → Dropout → Linear(num_classes). On 32-px inputs
    the pool just repeats the 1x1 map 49 times, so that head costs ~100M weights for
    nothing; ``head="small"`` (the usual CIFAR VGG) is global average pool → Dropout →
    Linear(512, num_classes). ``conv_dropout`` adds Dropout after every pool. A
    ``pooling`` mapping reshapes the five 2x2/2 pools; both heads take any map size.
    """
    check_min_size(name, image_size, VGG_MIN_SIZE, "it halves the image 5 times",
                   "resize the images (data.resize) or use 'minivgg'")
    head = choose(head, HEADS, f"{name} head")
    features = make_layers(cfg, in_channels, activation=activation, pooling=pooling,
                           batch_norm=batch_norm, pool_dropout=conv_dropout)
    if isinstance(pooling, Mapping):  # string pools keep the 2x2/2 geometry checked above
        probe(features, in_channels, image_size, name, {"model.pooling": pooling})
    width = [c for c in cfg if c != "M"][-1]
    if head == "imagenet":
        avgpool = nn.AdaptiveAvgPool2d(7)
        # Linear → act → Dropout, in torchvision's order, so indices 0/3/6 hold the Linears.
        classifier = nn.Sequential(
            nn.Linear(width * 7 * 7, 4096),
            make_activation(activation, channels=4096, dim=1),
            make_dropout(dropout),
            nn.Linear(4096, 4096),
            make_activation(activation, channels=4096, dim=1),
            make_dropout(dropout),
            nn.Linear(4096, num_classes),
        )
    else:  # "small"
        avgpool = nn.AdaptiveAvgPool2d(1)
        classifier = nn.Sequential(make_dropout(dropout), nn.Linear(width, num_classes))
    return he_init(VGG(features, classifier, avgpool))


def _vgg(depth: int, config: str, bn: bool):
    """Register ``vgg{depth}`` (``_bn``): the family function with one cfg and BN default.

    The builder's signature stays explicit because the registry reads the accepted
    keyword arguments and their defaults from it.
    """
    name = f"vgg{depth}_bn" if bn else f"vgg{depth}"

    def build(*, in_channels: int, num_classes: int, image_size: int | tuple[int, int],
              activation: str = "relu", batch_norm: bool = bn, dropout: float = 0.5,
              pooling: PoolSpec = "max", head: str = "imagenet",
              conv_dropout: float = 0.0) -> nn.Module:
        return vgg(name, CFGS[config], in_channels=in_channels, num_classes=num_classes,
                   image_size=image_size, activation=activation, batch_norm=batch_norm,
                   dropout=dropout, pooling=pooling, head=head, conv_dropout=conv_dropout)

    convs = sum(1 for item in CFGS[config] if item != "M")
    build.__name__ = build.__qualname__ = name
    norm = ", BatchNorm after every conv (conv → BN → act, as torchvision)" if bn else ""
    build.__doc__ = f"{name}: VGG-{depth}, configuration {config} ({convs} convs + 3 FC){norm}."
    return register_model(name, min_image_size=VGG_MIN_SIZE)(build)


_DEPTHS = {11: "A", 13: "B", 16: "D", 19: "E"}
vgg11, vgg13, vgg16, vgg19 = (_vgg(depth, cfg, bn=False) for depth, cfg in _DEPTHS.items())
vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn = (_vgg(depth, cfg, bn=True) for depth, cfg in _DEPTHS.items())
