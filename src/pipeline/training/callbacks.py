"""Lightning callbacks: per-epoch curves to disk and MLflow, one batched write per epoch."""

from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from pipeline.files import write_with
from pipeline.tracking.mlflow_run import TrackedRun
from pipeline.training.metrics import EPOCH_METRICS, ties_better


class EpochRecorder(Callback):
    """Collects each epoch's metrics as a row (for `dvc plots`), logs them to MLflow in one
    batch, and stops training if the loss is no longer finite. The rows travel in checkpoints,
    so a run resumed from one has the whole curve (and logs the earlier epochs to its own run)."""

    def __init__(self, run: TrackedRun | None = None) -> None:
        self.run = run
        self.rows: list[dict[str, float]] = []
        self._start = 0.0
        self.diverged = False

    def state_dict(self) -> dict:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run is not None and trainer.is_global_zero:  # the epochs a resumed checkpoint brought
            for row in self.rows:
                self.run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

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
        decision = ties_better(float(current), float(tie), float(self.best_model_score), self.best_tie_value)
        return trainer.strategy.reduce_boolean_decision(decision)

    def _update_best_and_save(self, current: torch.Tensor, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._update_best_and_save(current, trainer, monitor_candidates)
        tie = monitor_candidates.get(self.tie_breaker)
        self.best_tie_value = float(tie) if tie is not None else math.inf

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_tie_value": self.best_tie_value}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_tie_value = state_dict.pop("best_tie_value", math.inf)
        old_best = Path(state_dict.get("best_model_path") or "")
        moved = state_dict.get("dirpath", self.dirpath) != self.dirpath
        if moved and self.dirpath and old_best.is_file() and state_dict.get("best_model_score") is not None:
            # Resumed into another folder (`pipeline train trainer.resume_from=...`). Lightning
            # would forget the best score and keep the best of the epochs since the resume, which
            # the curves (they go back to epoch 0) would contradict: carry the best on, file too.
            best = Path(self.dirpath) / old_best.name
            shutil.copyfile(old_best, best)
            score = state_dict["best_model_score"]
            state_dict = {**state_dict, "dirpath": self.dirpath, "best_model_path": str(best),
                          "kth_best_model_path": str(best), "kth_value": score, "best_k_models": {str(best): score},
                          "last_model_path": ""}
        elif moved:
            self.best_tie_value = math.inf  # the best it was tied with is not carried on either
        super().load_state_dict(state_dict)


class RandomState(Callback):
    """Carries the random state in checkpoints (torch's and Python's global generators, and
    the regularizers' own, e.g. batch augmentation's), so that a run resumed from one draws
    the same dropout masks and augmentations as one never stopped: the same curve, exactly on
    CPU. Lightning saves none of them. Restored only when training resumes (a callback's
    hook), never when a model is merely loaded from a checkpoint."""

    KEY = "random_state"

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[self.KEY] = {
            "torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generators": [g.get_state() for g in pl_module.regularizers.generators()],
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get(self.KEY)
        if state is None:  # an older checkpoint: the run goes on with fresh draws
            return
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        for generator, saved in zip(pl_module.regularizers.generators(), state["generators"], strict=False):
            generator.set_state(saved)


class EvolutionCheckpoints(Callback):
    """Keeps the network's weights after the given epochs (1: after the first) as
    `<dirpath>/epoch_<n>.pt`, a state dict of `pl_module.net`, for the report's feature
    evolution (Zeiler & Fergus 2014, Fig. 4). Only the weights: no optimizer state, since
    nothing resumes from them. Written once validation has run, at the end of the epoch."""

    def __init__(self, dirpath: Path, epochs: list[int]) -> None:
        self.dirpath = Path(dirpath)
        self.epochs = set(epochs)
        self.saved: list[Path] = []

    @staticmethod
    def path(dirpath: Path, epoch: int) -> Path:
        return Path(dirpath) / f"epoch_{epoch}.pt"

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if done not in self.epochs or not trainer.is_global_zero or trainer.sanity_checking:
            return
        state = {k: v.detach().cpu() for k, v in pl_module.net.state_dict().items()}
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self.saved.append(write_with(self.path(self.dirpath, done), lambda f: torch.save(state, f)))
