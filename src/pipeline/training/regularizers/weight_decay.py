"""Decoupled weight decay (Loshchilov & Hutter 2019), with whatever optimizer is chosen."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.config import check_number
from pipeline.training.regularizers.loss import penalized_parameters
from pipeline.training.regularizers.registry import Regularizer, register_regularizer


@torch.no_grad()
def decoupled_weight_decay(params: Iterable[torch.Tensor], lr: float, weight_decay: float) -> None:
    """w <- w - lr * wd * w, applied beside the optimizer's own step (Loshchilov & Hutter 2019)."""
    if weight_decay:
        for p in params:
            p.mul_(1.0 - lr * weight_decay)


@register_regularizer("weight_decay", default=0.0)
class WeightDecay(Regularizer):
    """Shrinks conv/linear weights by lr * wd before each optimizer step."""

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_number(cfg, key, low=0)

    def before_optimizer_step(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # Beside (not through) the gradient, with each parameter group's own learning rate.
        decayed = {id(p) for p in penalized_parameters(net)}
        for group in optimizer.param_groups:
            decoupled_weight_decay([p for p in group["params"] if id(p) in decayed], group["lr"], self.value)
