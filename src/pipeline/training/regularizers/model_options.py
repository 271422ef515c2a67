"""Regularizers that are options of the network itself: the value is passed to the model
builder as the keyword of the same name (see `pipeline.validation.model_args`), and null
keeps the model's own default (e.g. MiniVGG's dropout 0.5 and batch norm)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from pipeline.config import check_bool, check_number, get_required
from pipeline.training.regularizers.registry import Regularizer, register_regularizer


class ModelOption(Regularizer):
    """A keyword of every model builder that takes it; null leaves the builder's default."""

    @property
    def active(self) -> bool:
        return self.value is not None

    def model_kwargs(self) -> dict[str, Any]:
        return {self.key: self.value}


# Dropout layers hold no parameters, so a restored checkpoint takes any new p.
@register_regularizer("dropout", default=None, pbt_mutable=True)
class Dropout(ModelOption):
    """Dropout with probability p before the classifier's linear layers (Srivastava et al. 2014)."""

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_number(cfg, key, low=0, high=1, high_open=True, optional=True)


@register_regularizer("conv_dropout", default=None)
class ConvDropout(ModelOption):
    """Spatial dropout (Dropout2d) after conv blocks, where the model has them (Tompson et al. 2015)."""

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_number(cfg, key, low=0, high=1, high_open=True, optional=True)


@register_regularizer("batch_norm", default=None)
class BatchNorm(ModelOption):
    """Batch normalisation after every conv/linear layer the model has (Ioffe & Szegedy 2015)."""

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        if get_required(cfg, key) is not None:
            check_bool(cfg, key)
