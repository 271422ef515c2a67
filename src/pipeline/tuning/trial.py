"""One Ray Tune trial: the sampled overrides -> a plain config -> the train task it is given.

The trial tracks nothing in MLflow (the driver is the only writer: see `mlflow_tree`); a
Lightning callback reports each epoch to Tune with a checkpoint that PBT exploits and that
a retried trial (`tune.max_failures`) resumes from.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from pipeline.quiet import quiet_ray_worker
from pipeline.training.metrics import EPOCH_METRICS
from pipeline.tuning.pareto import cost_probe, measure_costs
from pipeline.tuning.predictions import ValPredictions
from pipeline.tuning.ray_init import Shared
from pipeline.tuning.recovery import CKPT_FILE, META_FILE, resume_checkpoint
from pipeline.tuning.selection import CORRECT_KEY
from pipeline.tuning.space import trial_config

# `pipeline.tasks.train.train`: (cfg, *, callbacks, ckpt_path, trainer_kwargs, figures, data) -> metrics.
# Passed in rather than imported, since the tasks sit above this library.
TrainFn = Callable[..., dict[str, float]]

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


def _own_checkpoint(driver: str) -> Any:
    """The checkpoint this (re)started trial resumes from (None on a first start)."""
    from ray import tune

    # The trial's folder in the sweep's storage (local, shared or cloud), where the driver
    # records each result's checkpoint (a developer API of Ray Train's storage context).
    storage = tune.get_context().get_storage()
    return resume_checkpoint(tune.get_checkpoint(), storage.storage_filesystem, storage.trial_fs_path, driver)


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


def trial_accelerator(gpu_ids: Sequence[Any], cuda_available: bool) -> tuple[str, int | str]:
    """(trainer.accelerator, trainer.devices) for `accelerator: auto` in a trial: the GPU Ray
    assigned (Ray sets CUDA_VISIBLE_DEVICES to it) when there is one and CUDA works, else the
    CPU, so a trial without a GPU never grabs one and logical GPUs without CUDA run on the CPU."""
    return ("gpu", 1) if gpu_ids and cuda_available else ("cpu", "auto")


def _trial_dir(experiment: str | None) -> Path:
    """The trial's folder in the experiment's local (or shared) storage, which Ray's own trial
    folder name ends; with cloud storage (`experiment` None), the trial's working folder,
    which Ray uploads (`SyncConfig(sync_artifacts=True)`)."""
    from ray import tune

    working = Path(tune.get_context().get_trial_dir())  # /tmp/ray/session_*/.../working_dirs/<trial>
    folder = Path(experiment) / working.name if experiment else working
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_trial(config: dict[str, Any], *, train: TrainFn, base: Mapping[str, Any], blocks: Mapping[str, Any],
              experiment: str | None = None, callbacks: Sequence[Callback] = (),
              ddp: Mapping[str, Any] | None = None, data: Shared | None = None, driver: str = "") -> None:
    """The Tune function trainable, fitting with `train`. `config` holds the sampled `{dotted key: value}`; `base`
    is the sweep's resolved config (absolute paths, tracking off, trainer.max_epochs set);
    `experiment` the experiment folder when storage is a file system path. With `tune.cv`
    the trial trains every fold (`pipeline.tuning.cv_trial`). With `ddp`
    (`workers`, `cpu`, `gpu`, `storage`: `tune.workers > 1`) the trial holds no resources and
    trains with a Ray Train TorchTrainer of `workers` DDP ranks (`pipeline.tuning.ddp`).
    `data` holds what every trial trains on (train's `data=`), read by the driver; `driver`
    is the driver's `recovery.driver_id()`, whose records a retried trial may resume from."""
    import torch
    from omegaconf import OmegaConf
    from ray import tune

    # "GPU available: ..." and "Checkpoint successfully created at ..." every trial and epoch.
    quiet_ray_worker("ray.train", "ray.tune")
    # Restoring another trial's checkpoint (PBT) or a resumed one moves the checkpoint folder.
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))

    plain = trial_config(base, config, blocks)
    plain["paths"]["out_dir"] = str(_trial_dir(experiment))
    if ddp:
        _run_ddp_trial(plain, train, ddp, callbacks, data, driver)  # each rank gets the data itself
        return
    loaded = data.get() if data is not None else None
    if plain["trainer"].get("accelerator", "auto") == "auto":
        import ray

        accelerator, devices = trial_accelerator(ray.get_gpu_ids(), torch.cuda.is_available())
        plain["trainer"].update(accelerator=accelerator, devices=devices)
    if plain["tune"].get("cv"):
        from pipeline.tuning.cv_trial import run_cv_trial

        run_cv_trial(plain, train, callbacks=callbacks, data=loaded)
        return
    cfg = OmegaConf.create(plain)
    # (Lookahead keeps its rate in optimizer.base.lr.)
    lr = float(OmegaConf.select(cfg, "optimizer.lr", default=None) or OmegaConf.select(cfg, "optimizer.base.lr") or 0)

    costs = cost_probe(plain)
    system = bool(plain["tune"].get("system_metrics"))
    checkpoint = _own_checkpoint(driver)
    if checkpoint is None:
        train(cfg, callbacks=[TuneReporter(lr=lr, costs=costs, system=system), *callbacks], figures=False,
              data=loaded)
        return
    with checkpoint.as_directory() as folder:
        meta_file = Path(folder) / META_FILE
        old_lr = json.loads(meta_file.read_text())["lr"] if meta_file.exists() else lr
        reporter = TuneReporter(lr=lr, lr_scale=lr / old_lr if old_lr and lr else 1.0, costs=costs, system=system)
        train(cfg, callbacks=[reporter, *callbacks], ckpt_path=str(Path(folder) / CKPT_FILE), figures=False,
              data=loaded)


def _lr(plain: Mapping[str, Any]) -> float:
    """The trial's learning rate (Lookahead keeps its rate in optimizer.base.lr)."""
    optimizer = plain.get("optimizer") or {}
    return float(optimizer.get("lr") or (optimizer.get("base") or {}).get("lr") or 0)


def _run_ddp_trial(plain: dict[str, Any], train: TrainFn, ddp: Mapping[str, Any],
                   callbacks: Sequence[Callback], data: Shared | None, driver: str) -> None:
    from pipeline.tuning.ddp import run_ddp

    lr = _lr(plain)
    lr_scale = 1.0
    checkpoint = _own_checkpoint(driver)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            meta_file = Path(folder) / META_FILE
            old_lr = json.loads(meta_file.read_text())["lr"] if meta_file.exists() else lr
        lr_scale = lr / old_lr if old_lr and lr else 1.0
    run_ddp(plain, train, workers=int(ddp["workers"]), cpu=float(ddp["cpu"]), gpu=float(ddp["gpu"]),
            storage=ddp.get("storage"), lr=lr, lr_scale=lr_scale, checkpoint=checkpoint, callbacks=callbacks,
            data=data)
