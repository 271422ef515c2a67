"""What a trial reports to Ray Tune each epoch: a Lightning callback (`TuneReporter`) and its
helpers. Imported by the trial, in its own process: the sweep's driver never imports
Lightning (4 s here before Ray could start), since `trial.run_trial` imports this lazily.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L

from pipeline.training.metrics import EPOCH_METRICS
from pipeline.tuning.pareto import measure_costs
from pipeline.tuning.predictions import ValPredictions
from pipeline.tuning.recovery import CKPT_FILE, META_FILE
from pipeline.tuning.selection import CORRECT_KEY

LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # per-group rates torch schedulers keep


class TuneReporter(ValPredictions):
    """Reports each epoch's metrics to Ray Tune with a full Lightning checkpoint.

    Runs after `EpochRecorder` (Lightning keeps callbacks' order, checkpoint callbacks last),
    so the epoch's metrics are final. A non-finite training loss ends the trial with a last
    report of `diverged: 1` and `val/acc` NaN, so the trial is never the best. Each report
    also carries which validation samples the epoch got right (`predictions.ValPredictions`).
    `lr_scale` rescales the restored optimizer's rates when PBT changed `optimizer.lr`.
    `costs` (`pareto.measure_costs`' keyword arguments): the model's costs, measured once at
    the start, go with every report (what `tune.objectives` ranks on besides accuracy).
    `system`: also this machine's CPU and memory use over the epoch (`tune.system_metrics`).
    """

    def __init__(self, *, lr: float = 0.0, lr_scale: float = 1.0, costs: Mapping[str, Any] | None = None,
                 system: bool = False) -> None:
        super().__init__()
        self.lr, self.lr_scale, self.costs, self.system = lr, lr_scale, costs, system
        self._first = True
        self._measured: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.lr_scale != 1.0:  # after the checkpoint's optimizer state was restored
            rescale_lr(trainer, self.lr_scale)
        if self.costs is not None:
            self._measured = measure_costs(pl_module.net, **self.costs)
        if self.system:
            import psutil

            psutil.cpu_percent()  # starts the count: the next call gives the mean since this one

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from ray import tune

        logged = trainer.callback_metrics
        metrics: dict[str, Any] = {k: float(logged[k]) for k in EPOCH_METRICS if k in logged}
        metrics.update(tune_iteration(trainer.current_epoch))
        metrics.update(self._measured)
        if self.system:
            metrics.update(system_sample())
        diverged = not all(math.isfinite(metrics.get(k, 0.0)) for k in ("train/loss", "val/loss"))
        metrics["diverged"] = int(diverged)
        if self.packed() is not None:
            metrics[CORRECT_KEY] = self.packed()
        if self._first:  # Tune adds node_ip and hostname to every result itself
            import ray

            metrics["gpu_ids"] = ",".join(str(g) for g in ray.get_gpu_ids())
            metrics["node_id"] = ray.get_runtime_context().get_node_id()  # node_ip repeats on one host
            self._first = False
        if diverged:
            metrics["val/acc"] = math.nan
            trainer.should_stop = True
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="trial-ckpt-") as folder:
            trainer.save_checkpoint(Path(folder) / CKPT_FILE)
            (Path(folder) / META_FILE).write_text(json.dumps({"lr": self.lr, "epoch": trainer.current_epoch}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def system_sample() -> dict[str, float]:
    """This machine's CPU use since the last call (the epoch) and its memory use now, under the
    names MLflow's system-metrics monitor gives train runs (psutil; mlflow itself is not
    imported in a trial: it costs a second or more)."""
    import psutil

    memory = psutil.virtual_memory()
    return {"system/cpu_utilization_percentage": float(psutil.cpu_percent()),
            "system/system_memory_usage_megabytes": memory.used / 1e6,
            "system/system_memory_usage_percentage": memory.used / memory.total * 100}


def tune_iteration(epoch: int) -> dict[str, int]:
    """The epoch, and Tune's `training_iteration` set from it (Tune counts reports since its
    last commit otherwise): a trial that resumes from a checkpoint Tune had not committed
    (`recovery.resume_checkpoint`) keeps its iterations equal to its epochs, as ASHA's and
    HyperBand's rungs and the stop at `tune.max_epochs` expect."""
    return {"epoch": epoch, "training_iteration": epoch + 1}


def rescale_lr(trainer: L.Trainer, factor: float) -> None:
    """Multiply every learning rate the optimizers and lr schedulers hold by `factor`."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            for key in LR_KEYS:
                if isinstance(group.get(key), (int, float)):
                    group[key] *= factor
    for config in trainer.lr_scheduler_configs:
        for attr in ("base_lrs", "target_lrs", "_last_lr"):
            values = getattr(config.scheduler, attr, None)
            if isinstance(values, list):
                setattr(config.scheduler, attr, [v * factor for v in values])
