"""Lightning callbacks: per-epoch curves to disk and MLflow, one batched write per epoch."""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from pipeline.tracking.mlflow_run import TrackedRun
from pipeline.training.metrics import EPOCH_METRICS


class EpochRecorder(Callback):
    """Collects each epoch's metrics as a row (for `dvc plots`), logs them to MLflow in one
    batch, and stops training if the loss is no longer finite."""

    def __init__(self, run: TrackedRun | None = None) -> None:
        self.run = run
        self.rows: list[dict[str, float]] = []
        self._start = 0.0
        self.diverged = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation has already run inside this epoch, so val/* are this epoch's values.
        # The curves plus every regularizer's loss term (train/loss_l2, train/loss_aux, ...).
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k in EPOCH_METRICS or k.startswith("train/loss_")}
        metrics["time/epoch_s"] = time.perf_counter() - self._start
        self.rows.append({"epoch": trainer.current_epoch, **metrics})
        if self.run is not None and trainer.is_global_zero:
            self.run.log_metrics(metrics, step=trainer.current_epoch)
        if not math.isfinite(metrics.get("train/loss", 0.0)):
            self.diverged = True
            trainer.should_stop = True


class BestCheckpoint(ModelCheckpoint):
    """Keeps the best checkpoint by the monitored metric; a tie goes to the lower `tie_breaker`.

    On small validation sets accuracy saturates (e.g. 100% from epoch 5 on digits) and a
    strict "greater than" would keep the first, least-trained epoch that reached it.
    """

    def __init__(self, *args, tie_breaker: str = "val/loss", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tie_breaker = tie_breaker
        self.best_tie_value = math.inf

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if super().check_monitor_top_k(trainer, current):
            return True
        tie = trainer.callback_metrics.get(self.tie_breaker)
        if current is None or tie is None or self.best_model_score is None:
            return False
        decision = bool(torch.isclose(current.float(), self.best_model_score.float()) and float(tie) < self.best_tie_value)
        return trainer.strategy.reduce_boolean_decision(decision)

    def _update_best_and_save(self, current: torch.Tensor, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._update_best_and_save(current, trainer, monitor_candidates)
        tie = monitor_candidates.get(self.tie_breaker)
        self.best_tie_value = float(tie) if tie is not None else math.inf

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_tie_value": self.best_tie_value}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_tie_value = state_dict.pop("best_tie_value", math.inf)
        super().load_state_dict(state_dict)
