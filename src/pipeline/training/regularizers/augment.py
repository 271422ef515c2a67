"""Data augmentation of training batches, as batched tensor ops (`pipeline.data.augment`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from omegaconf import DictConfig

from pipeline.config import check_number, get_required, to_container
from pipeline.data.augment import AugmentConfig, BatchAugment
from pipeline.training.regularizers.registry import Regularizer, register_regularizer

# Every transform's setting, off. resized_crop_ratio is not a config key: it keeps
# torchvision's 3/4..4/3.
_OFF = {f.name: f.default for f in dataclasses.fields(AugmentConfig) if f.name != "resized_crop_ratio"}
_INTEGERS = ("crop_padding", "cutout")


@register_regularizer("augment", default=_OFF)
class Augment(Regularizer):
    """Random flips, crops, affine warps, colour jitter and cutout; `regularizer.augment.<transform>`."""

    def __init__(self, value: dict[str, Any], *, seed: int = 0) -> None:
        super().__init__(value, seed=seed)
        config = AugmentConfig.from_dict(value)
        self.augment = BatchAugment(config, seed=seed) if config.active else None

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        for name in _OFF:
            if name != "resized_crop_scale":
                check_number(cfg, f"{key}.{name}", integer=name in _INTEGERS, low=0)
        # The ranges (and resized_crop_scale's shape) are AugmentConfig's own checks.
        AugmentConfig.from_dict(to_container(get_required(cfg, key)))

    @property
    def active(self) -> bool:
        return self.augment is not None

    def transform_batch(self, x: torch.Tensor) -> torch.Tensor:
        return self.augment(x)

    def generators(self) -> list[torch.Generator]:
        return [self.augment.generator] if self.augment is not None else []
