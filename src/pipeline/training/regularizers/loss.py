"""Regularizers of the loss: L1, L2 and elastic-net penalties (added terms, each logged as
`train/loss_<name>`) and label smoothing (a keyword of the cross-entropy). Penalties apply to
weight tensors (conv kernels, linear matrices), not to biases or normalisation parameters,
as is usual for weight decay."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.config import check_number
from pipeline.training.regularizers.registry import Regularizer, register_regularizer


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


@register_regularizer("l1", default=0.0)
class L1(Regularizer):
    """+ l1 * sum|w|: pushes weights to exactly zero."""

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_number(cfg, key, low=0)

    def loss_terms(self, net: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return penalties(penalized_parameters(net), l1=self.value)


@register_regularizer("l2", default=0.0)
class L2(Regularizer):
    """+ l2/2 * sum w^2: coupled weight decay (the gradient of SGD's weight_decay)."""

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_number(cfg, key, low=0)

    def loss_terms(self, net: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return penalties(penalized_parameters(net), l2=self.value)


@register_regularizer("elastic", default={"alpha": 0.0, "l1_ratio": 0.5})
class Elastic(Regularizer):
    """+ alpha * (l1_ratio * sum|w| + (1 - l1_ratio)/2 * sum w^2)."""

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_number(cfg, f"{key}.alpha", low=0)
        check_number(cfg, f"{key}.l1_ratio", low=0, high=1)

    @property
    def active(self) -> bool:
        return bool(self.value["alpha"])

    def loss_terms(self, net: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return penalties(penalized_parameters(net), elastic_alpha=self.value["alpha"],
                         elastic_l1_ratio=self.value["l1_ratio"])


@register_regularizer("label_smoothing", default=0.0)
class LabelSmoothing(Regularizer):
    """Targets (1 - eps) on the class and eps spread over all (Szegedy et al. 2016)."""

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_number(cfg, key, low=0, high=1, high_open=True)

    def criterion_kwargs(self) -> dict[str, float]:
        return {"label_smoothing": self.value}
