"""GoogLeNet / Inception v1 (Szegedy et al., "Going Deeper with Convolutions", CVPR 2015).

Laid out as ``torchvision.models.googlenet`` (same attribute names, so state_dict keys and
parameter counts match), including two torchvision choices that differ from the paper:
every conv is conv → BatchNorm(eps=1e-3) → ReLU (BN postdates the paper), and the
"5x5" branch uses a 3x3 conv (a slip torchvision keeps for its pretrained weights; set
``branch5x5_kernel=5`` for the paper's Table 1).

Auxiliary classifiers: with ``aux_logits=True`` the model still returns only the main
logits, so generic training code keeps working, but in training mode it also stores
``model.aux_outputs = (aux1_logits, aux2_logits)`` (after inception 4a and 4d; ``()`` in
eval mode or without aux heads). To use them as the paper did, add
``0.3 * sum(F.cross_entropy(a, y) for a in model.aux_outputs)`` to the loss; if the loss
ignores them their parameters get no gradients (DDP then needs find_unused_parameters).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.init import he_init
from pipeline.models.layers import (
    PoolSpec,
    check_min_size,
    choose,
    make_activation,
    make_dropout,
    make_norm,
    make_pool,
    pool_name,
    probe,
)
from pipeline.models.registry import register_model

# Table 1 of the paper: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
INCEPTIONS = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
# Smallest inputs. imagenet: 7x7/2 conv + four ceil-mode pools (torchvision's meta says
# 15 too); small: only the 3x3/2 pool before stage 4 needs a >= 2-px map.
MIN_SIZE = {"imagenet": 15, "small": 2}
STEMS = tuple(MIN_SIZE)
INCEPTION_KINDS = ("reduced", "naive")


class BasicConv2d(nn.Module):
    """conv → norm → act; the conv has a bias only when there is no norm to absorb it."""

    def __init__(self, cin: int, cout: int, kernel_size: int, *, activation, batch_norm,
                 stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        norm = make_norm(batch_norm, cout)
        if isinstance(norm, nn.BatchNorm2d):
            norm.eps = 1e-3  # torchvision's (and TF's) Inception value
        bias = isinstance(norm, nn.Identity)
        # conv before bn, so the state_dict lists keys in torchvision's order.
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=bias)
        self.bn = norm
        self.act = make_activation(activation, channels=cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _pool(pooling: PoolSpec, kernel: int, stride: int, padding: int = 0) -> nn.Module:
    # torchvision rounds pooled sizes up (ceil_mode), which is what lets 15 px through the
    # stem; a pooling mapping may override that like the kernel, stride and padding.
    return make_pool(pooling, kernel, stride, padding, ceil_mode=True)


class Inception(nn.Module):
    """Four parallel branches concatenated on channels (Figure 2 of the paper).

    ``naive`` (Fig. 2a): 1x1, 3x3 and 5x5 convs straight on the input plus a 3x3/1 pool
    passed through, so the output has ``in_channels`` more channels than the convs make
    and widths snowball stage by stage. ``reduced`` (Fig. 2b, GoogLeNet proper): 1x1
    "reduce" convs before the 3x3/5x5 and a 1x1 projection after the pool. The branch
    pool takes only the type from ``pooling``: it stays 3x3/1 padded, since its output
    must keep the input's size to be concatenated.
    """

    def __init__(self, cin: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int,
                 ch5x5: int, pool_proj: int, *, conv, pooling: PoolSpec, naive: bool = False,
                 kernel5: int = 3) -> None:
        super().__init__()
        self.branch1 = conv(cin, ch1x1, 1)
        pool = _pool(pool_name(pooling), 3, 1, padding=1)
        if naive:
            self.branch2 = conv(cin, ch3x3, 3, padding=1)
            self.branch3 = conv(cin, ch5x5, kernel5, padding=kernel5 // 2)
            self.branch4 = pool
            self.out_channels = ch1x1 + ch3x3 + ch5x5 + cin
        else:
            self.branch2 = nn.Sequential(conv(cin, ch3x3red, 1), conv(ch3x3red, ch3x3, 3, padding=1))
            self.branch3 = nn.Sequential(
                conv(cin, ch5x5red, 1), conv(ch5x5red, ch5x5, kernel5, padding=kernel5 // 2)
            )
            self.branch4 = nn.Sequential(pool, conv(cin, pool_proj, 1))
            self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary head: avg-pool to 4x4 → 1x1 conv (128) → FC 1024 → act → Dropout → FC."""

    def __init__(self, cin: int, num_classes: int, *, conv, activation, dropout: float) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(4)  # the paper's 5x5/3 pool on a 14x14 map
        self.conv = conv(cin, 128, 1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.act = make_activation(activation, channels=1024, dim=1)
        self.dropout = make_dropout(dropout, "aux_dropout")
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.avgpool(x)).flatten(1)
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class GoogLeNet(nn.Module):
    """Stem → inception 3a-3b → pool → 4a-4e → pool → 5a-5b → GAP → Dropout → FC.

    Stage pools (and the inception pool branches' type) follow ``pooling``; a mapping
    overrides the stage pools' 3x3/2 (2x2/2 before stage 5) geometry. The global average
    pool and the aux heads' pools are averages by design. With the small stem the
    ImageNet stem's later layers are Identity, so ``forward`` is the same for both.
    """

    def __init__(self, in_channels: int, num_classes: int, *, activation, batch_norm,
                 dropout: float, pooling: PoolSpec, conv_dropout: float, aux_logits: bool,
                 aux_dropout: float, naive: bool, kernel5: int, stem: str) -> None:
        super().__init__()
        conv = partial(BasicConv2d, activation=activation, batch_norm=batch_norm)

        def stage_pool(kernel: int) -> nn.Module:
            pool = _pool(pooling, kernel, 2)
            drop = make_dropout(conv_dropout, "conv_dropout")
            return nn.Sequential(pool, drop) if conv_dropout > 0 else pool

        if stem == "imagenet":
            self.conv1 = conv(in_channels, 64, 7, stride=2, padding=3)
            self.maxpool1 = stage_pool(3)
            self.conv2 = conv(64, 64, 1)
            self.conv3 = conv(64, 192, 3, padding=1)
            self.maxpool2 = stage_pool(3)
        else:  # one 3x3 conv at full resolution, as the common CIFAR GoogLeNets do
            self.conv1 = conv(in_channels, 192, 3, padding=1)
            self.maxpool1 = self.conv2 = self.conv3 = self.maxpool2 = nn.Identity()
        width = 192
        for tag, channels in INCEPTIONS.items():
            block = Inception(width, *channels, conv=conv, pooling=pooling, naive=naive,
                              kernel5=kernel5)
            setattr(self, f"inception{tag}", block)
            width = block.out_channels
            if tag == "4a":
                aux1_in = width
            elif tag == "4d":
                aux2_in = width
        self.maxpool3 = stage_pool(3)
        self.maxpool4 = stage_pool(2)
        if aux_logits:
            aux = partial(InceptionAux, num_classes=num_classes, conv=conv,
                          activation=activation, dropout=aux_dropout)
            self.aux1, self.aux2 = aux(aux1_in), aux(aux2_in)
        else:
            self.aux1 = self.aux2 = None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = make_dropout(dropout)
        self.fc = nn.Linear(width, num_classes)
        self.aux_outputs: tuple[torch.Tensor, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux = []
        train_aux = self.training and self.aux1 is not None
        if train_aux:
            aux.append(self.aux1(x))
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        if train_aux:
            aux.append(self.aux2(x))
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        self.aux_outputs = tuple(aux)
        return self.fc(self.dropout(self.avgpool(x).flatten(1)))

    def __getstate__(self):
        # Stored aux logits are non-leaf tensors, which copy.deepcopy (EMA/SWA callbacks,
        # best-model copies) refuses; they are per-step outputs, not state, so drop them.
        state = super().__getstate__()
        state["aux_outputs"] = ()
        return state


@register_model("googlenet", min_image_size=MIN_SIZE["imagenet"])
def googlenet(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int | tuple[int, int],
    activation: str = "relu",
    batch_norm: bool = True,
    dropout: float = 0.2,
    pooling: PoolSpec = "max",
    conv_dropout: float = 0.0,
    aux_logits: bool = False,
    aux_dropout: float = 0.7,
    inception: str = "reduced",
    stem: str = "imagenet",
    branch5x5_kernel: int = 3,
) -> nn.Module:
    """GoogLeNet; dropout 0.2 / aux_dropout 0.7 are torchvision's (the paper: 0.4 / 0.7).

    ``stem="imagenet"``: 7x7/2 conv, 3x3/2 pool, 1x1 and 3x3 convs, 3x3/2 pool (÷8 before
    inception 3a; any input >= 15 px). ``stem="small"``: one 3x3 conv to 192 channels and
    no pools, so a 32-px CIFAR image reaches inception 3a at 32 px (>= 2 px; ~1.3 GMACs
    per 32-px image, versus ~0.03 with the ImageNet stem at that size).
    ``inception``: "reduced" (the real GoogLeNet) or "naive" (Fig. 2a, no 1x1 reductions).
    ``pooling``: the stage pools' type, or a mapping such as ``{name: max, kernel_size: 3,
    stride: 2, padding: 1}`` that also sets their geometry (see ``make_pool``).
    """
    stem = choose(stem, STEMS, "googlenet stem")
    inception = choose(inception, INCEPTION_KINDS, "googlenet inception")
    make_dropout(aux_dropout, "aux_dropout")  # validate even when there are no aux heads
    k = branch5x5_kernel
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ConfigError(f"googlenet: branch5x5_kernel must be an odd positive int, got {k!r}.")
    hint = "stem='small' takes smaller images" if stem == "imagenet" else "resize the images"
    check_min_size("googlenet", image_size, MIN_SIZE[stem], f"with stem={stem!r}", hint)
    model = GoogLeNet(
        in_channels, num_classes, activation=activation, batch_norm=batch_norm,
        dropout=dropout, pooling=pooling, conv_dropout=conv_dropout,
        aux_logits=bool(aux_logits), aux_dropout=aux_dropout, naive=inception == "naive",
        kernel5=k, stem=stem,
    )
    if isinstance(pooling, Mapping):  # string pools keep the geometry MIN_SIZE covers
        probe(model, in_channels, image_size, "googlenet", {"model.pooling": pooling})
    # He init rather than torchvision's N(0, 0.01), which starves a batch_norm=False net.
    return he_init(model)
