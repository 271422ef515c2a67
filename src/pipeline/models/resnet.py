"""ResNets: He et al. 2015, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385),
optionally in the pre-activation form of He et al. 2016, "Identity Mappings in Deep Residual
Networks" (arXiv:1603.05027).

Two layouts, each preset a tiny builder over the family function :func:`resnet`:

* ImageNet (``resnet18/34/50/101/152``): 7x7/2 stem + 3x3/2 max pool, stages 64-128-256-512
  of BasicBlocks or Bottlenecks (x4 expansion), global average pool, FC. Parameter counts
  equal torchvision's. Bottlenecks stride in their 3x3 conv, as torchvision ("ResNet v1.5")
  does; the paper strided the first 1x1, which has the same parameters. ``stem="cifar"``
  swaps the stem for a 3x3 stride-1 conv without max pool, as usual for 32-px images.
  ``pooling`` sets the stem pool: its type, or a mapping such as ``{name: avg,
  kernel_size: 2, stride: 2}`` that also overrides the 3x3/2 pad-1 geometry.
* CIFAR (``resnet20/32/44/56/110``, paper section 4.2): 3x3 16-channel stem, stages
  16-32-64 of n = (depth - 2) / 6 BasicBlocks. ``shortcut="A"`` (the paper's choice)
  zero-pads and subsamples the identity where shapes change, adding no parameters;
  ``"B"`` uses 1x1 projections there.

``batch_norm=False`` turns every norm into Identity (and gives the convs biases); nets this
deep then train badly or diverge, so use it only for ablations. The building blocks here
(:class:`Ops`, :class:`Network`, :func:`bottleneck_unit`) are shared by ResNeXt and DenseNet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
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

Activation = str | Mapping


class Ops:
    """One model's layer choices (activation spec, norm on/off), so blocks take one argument."""

    def __init__(self, activation: Activation, batch_norm: bool | str | None) -> None:
        self.activation, self.batch_norm = activation, batch_norm
        # BN re-centres its input, so a conv bias before it is wasted (and torchvision has
        # none, which the exact parameter counts rely on); without BN the bias is kept.
        self.bias = isinstance(make_norm(batch_norm, 1), nn.Identity)

    def act(self, channels: int) -> nn.Module:
        return make_activation(self.activation, channels=channels)

    def norm(self, channels: int) -> nn.Module:
        return make_norm(self.batch_norm, channels)

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=self.bias)


def dropout2d(p: float) -> nn.Module:
    """Spatial dropout (whole channels), or Identity when ``p == 0``; validates ``p``."""
    p = make_dropout(p, "conv_dropout").p
    return nn.Dropout2d(p) if p > 0 else nn.Identity()


class Network(nn.Module):
    """stem → stages → final → classifier: the outline shared by ResNet, ResNeXt and DenseNet.

    ``final`` is the closing norm-act of pre-activation nets (Identity otherwise); the
    classifier is global average pool → Dropout(dropout) → Linear, so any input size works.
    """

    def __init__(self, stem: nn.Module, stages: nn.Sequential, final: nn.Module, channels: int,
                 num_classes: int, dropout: float) -> None:
        super().__init__()
        self.stem, self.stages, self.final = stem, stages, final
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = make_dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():  # torchvision's init: He-normal convs, BN at identity
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final(self.stages(self.stem(x)))
        return self.fc(self.dropout(self.pool(x).flatten(1)))


def make_stem(ops: Ops, kind: str, cin: int, cout: int, preact: bool,
              pooling: PoolSpec = "max", pool_key: str = "model.pooling") -> nn.Sequential:
    """ImageNet stem: 7x7/2 conv-norm-act + 3x3/2 pad-1 pool; CIFAR stem: one 3x3 conv.

    The ImageNet stem's pool is ``make_pool(pooling, 3, 2, 1)`` (``pool_key`` names the
    config entry in errors); the CIFAR stem has none. A pre-activation CIFAR stem is the
    bare conv, since the first unit begins with norm-act (He et al. 2016); the ImageNet
    stem keeps its norm-act because the pool follows it.
    """
    if kind == "imagenet":
        return nn.Sequential(ops.conv(cin, cout, 7, 2), ops.norm(cout), ops.act(cout),
                             make_pool(pooling, 3, 2, 1, key=pool_key))
    rest = [] if preact else [ops.norm(cout), ops.act(cout)]
    return nn.Sequential(ops.conv(cin, cout, 3), *rest)


class ZeroPadShortcut(nn.Module):
    """Option A: subsample the identity by ``stride`` and zero-pad the new channels."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = extra_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))


class Unit(nn.Module):
    """Residual unit: ``post(body(pre(x)) + shortcut(x))``.

    Original form: pre = Identity, body = conv-norm-act-...-conv-norm, post = act.
    Pre-activation: pre = norm-act, body = conv-norm-act-...-conv, post = Identity, and a
    non-identity shortcut reads the pre-activated input (it is a conv or a pad; the norm-act
    is shared), so the identity path stays clean.
    """

    def __init__(self, pre: nn.Module, body: nn.Sequential, shortcut: nn.Module | None,
                 post: nn.Module) -> None:
        super().__init__()
        self.pre, self.body, self.post = pre, body, post
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.reshape = shortcut is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pre(x)
        return self.post(self.body(a) + self.shortcut(a if self.reshape else x))


def make_unit(ops: Ops, convs: Sequence[tuple[int, int, int, int, int]], preact: bool,
              shortcut: str) -> Unit:
    """A unit from its convs ``(cin, cout, kernel, stride, groups)``; see :class:`Unit`."""
    body: list[nn.Module] = []
    for i, (cin, cout, k, s, g) in enumerate(convs):
        if preact:
            body += ([ops.norm(cin), ops.act(cin)] if i else []) + [ops.conv(cin, cout, k, s, g)]
        else:
            body += [ops.conv(cin, cout, k, s, g), ops.norm(cout)]
            body += [ops.act(cout)] if i < len(convs) - 1 else []
    cin, cout, stride = convs[0][0], convs[-1][1], max(c[3] for c in convs)
    short = None
    if stride != 1 or cin != cout:
        if shortcut == "a":
            short = ZeroPadShortcut(cout - cin, stride)
        else:  # projection; pre-activation feeds it normed input already, so no norm after
            short = nn.Sequential(ops.conv(cin, cout, 1, stride), *([] if preact else [ops.norm(cout)]))
    pre = nn.Sequential(ops.norm(cin), ops.act(cin)) if preact else nn.Identity()
    return Unit(pre, nn.Sequential(*body), short, nn.Identity() if preact else ops.act(cout))


def basic_unit(ops: Ops, cin: int, planes: int, stride: int, preact: bool, shortcut: str,
               groups: int = 1, base_width: int = 64) -> tuple[Unit, int]:
    """BasicBlock: two 3x3 convs, ``planes`` wide. Returns (unit, output channels)."""
    if groups != 1 or base_width != 64:
        raise ConfigError("Basic blocks take no cardinality/base_width; use bottlenecks.")
    convs = [(cin, planes, 3, stride, 1), (planes, planes, 3, 1, 1)]
    return make_unit(ops, convs, preact, shortcut), planes


def bottleneck_unit(ops: Ops, cin: int, planes: int, stride: int, preact: bool, shortcut: str,
                    groups: int = 1, base_width: int = 64) -> tuple[Unit, int]:
    """Bottleneck 1x1 → 3x3 (grouped: ResNeXt) → 1x1 to ``4 * planes``; width as torchvision."""
    width = int(planes * base_width / 64) * groups
    convs = [(cin, width, 1, 1, 1), (width, width, 3, stride, groups), (width, 4 * planes, 1, 1, 1)]
    return make_unit(ops, convs, preact, shortcut), 4 * planes


UNITS = {"basic": basic_unit, "bottleneck": bottleneck_unit}


def resnet(
    arch: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int | Sequence[int],
    block: str,
    layers: Sequence[int],
    stem: str,
    stem_width: int,
    activation: Activation = "relu",
    batch_norm: bool = True,
    dropout: float = 0.0,
    conv_dropout: float = 0.0,
    preact: bool = False,
    shortcut: str = "B",
    groups: int = 1,
    base_width: int = 64,
    pooling: PoolSpec = "max",
) -> Network:
    """The family: ``len(layers)`` stages of ``layers[i]`` units, ``stem_width * 2**i`` planes.

    Each stage after the first halves the map in its first unit; ``conv_dropout`` adds
    Dropout2d after every stage; ``groups``/``base_width`` make bottlenecks ResNeXt's.
    ``pooling`` is the ImageNet stem's pool (unused by the CIFAR stem, which has none).
    """
    layers = check_positive_ints(layers, "layers")
    if not layers:
        raise ConfigError(f"{arch} needs at least one stage in layers, e.g. [2, 2, 2].")
    stem = choose(stem, ("imagenet", "cifar"), f"{arch} stem")
    if stem == "cifar":
        make_pool(pooling, 3, 2, 1)  # no stem pool to build, but still reject a bad spec
    shortcut = choose(shortcut, ("a", "b"), f"{arch} shortcut")
    if not isinstance(preact, bool):
        raise ConfigError(f"preact must be true or false, got {preact!r}.")
    min_size = (4 if stem == "imagenet" else 1) * 2 ** (len(layers) - 1)
    check_min_size(arch, image_size, min_size, f"its {stem} stem and {len(layers)} stages "
                   "downsample that much")
    ops, unit = Ops(activation, batch_norm), UNITS[block]
    channels, stages = stem_width, []
    for i, n in enumerate(layers):
        blocks = []
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            u, channels = unit(ops, channels, stem_width * 2**i, stride, preact, shortcut,
                               groups, base_width)
            blocks.append(u)
        stages.append(nn.Sequential(*blocks, dropout2d(conv_dropout)))
    final = nn.Sequential(ops.norm(channels), ops.act(channels)) if preact else nn.Identity()
    model = Network(make_stem(ops, stem, in_channels, stem_width, preact, pooling),
                    nn.Sequential(*stages), final, channels, num_classes, dropout)
    if stem == "imagenet" and isinstance(pooling, Mapping):  # a string keeps min_size's geometry
        probe(model, in_channels, image_size, arch, {"model.pooling": pooling})
    return model


def _imagenet(name: str, block: str, layers: tuple[int, ...]):
    def build(*, in_channels: int, num_classes: int, image_size: int | tuple[int, int],
              activation: Activation = "relu", batch_norm: bool = True, dropout: float = 0.0,
              conv_dropout: float = 0.0, preact: bool = False, stem: str = "imagenet",
              pooling: PoolSpec = "max") -> nn.Module:
        return resnet(name, in_channels=in_channels, num_classes=num_classes,
                      image_size=image_size, block=block, layers=layers, stem=stem, stem_width=64,
                      activation=activation, batch_norm=batch_norm, dropout=dropout,
                      conv_dropout=conv_dropout, preact=preact, pooling=pooling)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{name}: ImageNet ResNet, {block} units {list(layers)} (He et al. 2015, "
                     "Table 1). Needs 32 px (8 px with stem='cifar'). ``pooling`` sets the "
                     "stem's 3x3/2 max pool (a type, or a mapping also overriding its geometry).")
    return register_model(name, min_image_size=32)(build)


def resnet_cifar(arch: str, *, depth: int, **kwargs) -> Network:
    """He et al. 2015's CIFAR net: depth = 6n + 2, three stages 16-32-64 of n basic units."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"{arch}: CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110, ...), "
                          f"got {depth!r}.")
    n = (depth - 2) // 6
    return resnet(arch, block="basic", layers=(n, n, n), stem="cifar", stem_width=16, **kwargs)


def _cifar(depth: int):
    name = f"resnet{depth}"

    def build(*, in_channels: int, num_classes: int, image_size: int | tuple[int, int],
              activation: Activation = "relu", batch_norm: bool = True, dropout: float = 0.0,
              conv_dropout: float = 0.0, preact: bool = False, shortcut: str = "A") -> nn.Module:
        return resnet_cifar(name, depth=depth, in_channels=in_channels, num_classes=num_classes,
                            image_size=image_size, activation=activation, batch_norm=batch_norm,
                            dropout=dropout, conv_dropout=conv_dropout, preact=preact,
                            shortcut=shortcut)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{name}: He et al. 2015's CIFAR ResNet, 3 x {(depth - 2) // 6} basic "
                     "units, 16-32-64 channels (section 4.2). Needs 4 px.")
    return register_model(name, min_image_size=4)(build)


resnet18 = _imagenet("resnet18", "basic", (2, 2, 2, 2))
resnet34 = _imagenet("resnet34", "basic", (3, 4, 6, 3))
resnet50 = _imagenet("resnet50", "bottleneck", (3, 4, 6, 3))
resnet101 = _imagenet("resnet101", "bottleneck", (3, 4, 23, 3))
resnet152 = _imagenet("resnet152", "bottleneck", (3, 8, 36, 3))
resnet20, resnet32, resnet44, resnet56, resnet110 = (_cifar(d) for d in (20, 32, 44, 56, 110))
