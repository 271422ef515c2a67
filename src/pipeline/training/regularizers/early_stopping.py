"""Early stopping: end training when the optimised metric stops improving."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from pipeline.config import check_bool, check_number
from pipeline.training.regularizers.registry import Regularizer, register_regularizer

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback


@register_regularizer("early_stopping", default={"enabled": True, "patience": 10, "min_delta": 0.0})
class EarlyStopping(Regularizer):
    """Stops after `patience` epochs without an improvement of more than `min_delta` (an equal
    score with a lower validation loss counts as one: see `TieBreakingStop`)."""

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        check_bool(cfg, f"{key}.enabled")
        check_number(cfg, f"{key}.patience", integer=True, low=0)
        check_number(cfg, f"{key}.min_delta", low=0)

    @property
    def active(self) -> bool:
        return self.value["enabled"]

    def callbacks(self, *, monitor: str, mode: str) -> list[Callback]:
        # Imported here: Lightning takes seconds to import, and validating a config (the
        # tune driver, every `prepare`) builds this class without needing it.
        from pipeline.training.stopping import TieBreakingStop

        return [TieBreakingStop(monitor=monitor, mode=mode, patience=self.value["patience"],
                     min_delta=self.value["min_delta"], check_finite=True)]


def still_improving(values: Sequence[float], *, max_epochs: int, patience: int, min_delta: float = 0.0,
                    mode: str = "max") -> bool:
    """Whether a run that recorded `values` (its monitored metric, one per epoch) was cut by its
    epoch budget while still improving: it ran all `max_epochs` epochs, and its last improvement
    (by more than `min_delta`, as Lightning's EarlyStopping counts one) came within its last
    `max(patience, 1)` epochs, so early stopping on that metric alone had not ended it.

    Then more epochs might have helped, and comparing such runs compares budgets, not designs.
    A run early stopping ended (or that diverged: a non-finite value ends it early) was not.
    Ties with a lower validation loss keep training going (`TieBreakingStop`) but do not count
    here: they leave the compared score where it is.
    """
    if len(values) < max_epochs:
        return False
    sign = 1.0 if mode == "max" else -1.0
    best, last_improvement = -math.inf, -1
    for epoch, value in enumerate(values):
        if not math.isfinite(value):
            return False
        if sign * value - min_delta > best:
            best, last_improvement = sign * value, epoch
    return len(values) - 1 - last_improvement < max(patience, 1)
