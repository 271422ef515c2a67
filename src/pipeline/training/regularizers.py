"""Loss-side regularizers (L1, L2, elastic net), decoupled weight decay and test-time
augmentation. Penalties apply to weight tensors (conv kernels, linear matrices), not to
biases or normalisation parameters, as is usual for weight decay."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError


def penalized_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights of conv and linear layers: every trainable parameter with 2 or more dims."""
    return [p for p in model.parameters() if p.requires_grad and p.dim() > 1]


def penalties(params: Iterable[torch.Tensor], *, l1: float = 0.0, l2: float = 0.0,
              elastic_alpha: float = 0.0, elastic_l1_ratio: float = 0.5) -> dict[str, torch.Tensor]:
    """Penalty terms to add to the loss, each reported separately.

    l1: l1 * sum|w| (gradient l1 * sign(w)); l2: l2/2 * sum w^2 (gradient l2 * w, the
    same as coupled weight decay); elastic (scikit-learn's convention):
    alpha * (ratio * sum|w| + (1 - ratio)/2 * sum w^2).
    """
    params = list(params)
    terms: dict[str, torch.Tensor] = {}
    if l1:
        terms["l1"] = l1 * sum(p.abs().sum() for p in params)
    if l2:
        terms["l2"] = 0.5 * l2 * sum(p.pow(2).sum() for p in params)
    if elastic_alpha:
        terms["elastic"] = elastic_alpha * sum(
            elastic_l1_ratio * p.abs().sum() + 0.5 * (1 - elastic_l1_ratio) * p.pow(2).sum() for p in params)
    return terms


@torch.no_grad()
def decoupled_weight_decay(params: Iterable[torch.Tensor], lr: float, weight_decay: float) -> None:
    """w <- w - lr * wd * w, applied beside the optimizer's own step (Loshchilov & Hutter 2019)."""
    if weight_decay:
        for p in params:
            p.mul_(1.0 - lr * weight_decay)


# --------------------------------------------------------------------------- test-time augmentation

def _flip(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (F.softmax(net(x), 1) + F.softmax(net(x.flip(-1)), 1)) / 2


def _ten_crop(net: nn.Module, x: torch.Tensor, crop_fraction: float = 0.875) -> torch.Tensor:
    """AlexNet's ten-crop: four corners and the centre, each also flipped, resized back to
    the network's input size and averaged."""
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * crop_fraction)), max(1, round(w * crop_fraction))
    offsets = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)]
    total = 0
    for top, left in offsets:
        crop = x[..., top : top + ch, left : left + cw]
        crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        total = total + F.softmax(net(crop), 1) + F.softmax(net(crop.flip(-1)), 1)
    return total / 10


def _none(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.softmax(net(x), 1)


TTA = {"none": _none, "flip": _flip, "ten_crop": _ten_crop}


def tta_probabilities(net: nn.Module, x: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """Class probabilities for a batch, averaged over the views of `mode`."""
    if mode not in TTA:
        raise ConfigError(f"regularizer.tta={mode!r} is not one of: {', '.join(TTA)}.")
    return TTA[mode](net, x)
