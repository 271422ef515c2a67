"""Early stopping whose ties go to the lower validation loss, as the best checkpoint's do.

Its own module, not `callbacks`: the early-stopping regularizer imports it when it builds its
callback, and every stage validates the regularizers, so what this imports every stage's DVC
dependencies include (`pipeline deps`).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping

from pipeline.training.metrics import ties_better


class TieBreakingStop(EarlyStopping):
    """Early stopping that counts a tie on the monitored metric with a lower `tie_breaker` as an
    improvement, as `BestCheckpoint` does: once validation accuracy saturates (100% on a small
    split) training goes on while validation loss still falls, instead of stopping `patience`
    epochs after the first perfect epoch with an undertrained model."""

    def __init__(self, *args, tie_breaker: str = "val/loss", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tie_breaker = tie_breaker
        self.best_tie_value = math.inf
        self._tie: float | None = None

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        tie = trainer.callback_metrics.get(self.tie_breaker)
        self._tie = float(tie) if tie is not None else None
        super()._run_early_stopping_check(trainer)

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        sign = 1.0 if self.mode == "max" else -1.0
        if (torch.isfinite(current) and torch.isfinite(self.best_score)
                and ties_better(sign * float(current), self._tie, sign * float(self.best_score), self.best_tie_value)):
            self.wait_count = 0
            self.best_tie_value = self._tie
            return False, None
        before = float(self.best_score)
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        if float(self.best_score) != before:  # a strict improvement: its tie value is the new mark
            self.best_tie_value = self._tie if self._tie is not None else math.inf
        return should_stop, reason

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_tie_value": self.best_tie_value}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_tie_value = state_dict.get("best_tie_value", math.inf)
        super().load_state_dict(state_dict)
