"""Test-time augmentation: class probabilities averaged over several views of each image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from pipeline.config import check_choice
from pipeline.errors import ConfigError
from pipeline.training.regularizers.registry import Regularizer, register_regularizer


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


@register_regularizer("tta", default="none")
class TtaViews(Regularizer):
    """`none`, `flip` (the image and its mirror) or `ten_crop` (AlexNet's ten crops)."""

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_choice(cfg, key, list(TTA))

    @property
    def active(self) -> bool:
        return self.value != "none"

    def probabilities(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return tta_probabilities(net, x, self.value)
