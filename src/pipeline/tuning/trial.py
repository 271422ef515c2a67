"""One Ray Tune trial: the sampled overrides -> a plain config -> the train task it is given.

The trial tracks nothing in MLflow (the driver is the only writer: see `mlflow_tree`); a
Lightning callback (`reporter.TuneReporter`, imported in the trial's process only) reports
each epoch to Tune with a checkpoint that PBT exploits and that a retried trial
(`tune.max_failures`) resumes from.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.quiet import quiet_worker
from pipeline.tuning.pareto import cost_probe
from pipeline.tuning.ray_init import Shared
from pipeline.tuning.recovery import CKPT_FILE, META_FILE, resume_checkpoint
from pipeline.tuning.space import trial_config

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback

# `pipeline.tasks.train.train`: (cfg, *, callbacks, ckpt_path, trainer_kwargs, figures, data) -> metrics.
# Passed in rather than imported, since the tasks sit above this library.
TrainFn = Callable[..., dict[str, float]]


def _own_checkpoint(driver: str) -> Any:
    """The checkpoint this (re)started trial resumes from (None on a first start)."""
    from ray import tune

    # The trial's folder in the sweep's storage (local, shared or cloud), where the driver
    # records each result's checkpoint (a developer API of Ray Train's storage context).
    storage = tune.get_context().get_storage()
    return resume_checkpoint(tune.get_checkpoint(), storage.storage_filesystem, storage.trial_fs_path, driver)


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

    from pipeline.tuning.reporter import TuneReporter

    # "GPU available: ..." and "Checkpoint successfully created at ..." every trial and epoch.
    quiet_worker("ray.train", "ray.tune")
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
    cfg, lr = OmegaConf.create(plain), _lr(plain)
    costs = cost_probe(plain)
    system = bool(plain["tune"].get("system_metrics"))
    checkpoint = _own_checkpoint(driver)
    if checkpoint is None:
        train(cfg, callbacks=[TuneReporter(lr=lr, costs=costs, system=system), *callbacks], figures=False,
              data=loaded)
        return
    with checkpoint.as_directory() as folder:
        reporter = TuneReporter(lr=lr, lr_scale=_lr_scale(folder, lr), costs=costs, system=system)
        train(cfg, callbacks=[reporter, *callbacks], ckpt_path=str(Path(folder) / CKPT_FILE), figures=False,
              data=loaded)


def _lr(plain: Mapping[str, Any]) -> float:
    """The trial's learning rate (Lookahead keeps its rate in optimizer.base.lr)."""
    optimizer = plain.get("optimizer") or {}
    return float(optimizer.get("lr") or (optimizer.get("base") or {}).get("lr") or 0)


def _lr_scale(folder: str, lr: float) -> float:
    """This trial's learning rate over the one its checkpoint in `folder` trained with (a PBT
    clone takes its donor's checkpoint with a perturbed rate)."""
    meta_file = Path(folder) / META_FILE
    old_lr = json.loads(meta_file.read_text())["lr"] if meta_file.exists() else lr
    return lr / old_lr if old_lr and lr else 1.0


def _run_ddp_trial(plain: dict[str, Any], train: TrainFn, ddp: Mapping[str, Any],
                   callbacks: Sequence[Callback], data: Shared | None, driver: str) -> None:
    from pipeline.tuning.ddp import run_ddp

    lr, lr_scale = _lr(plain), 1.0
    checkpoint = _own_checkpoint(driver)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            lr_scale = _lr_scale(folder, lr)
    run_ddp(plain, train, workers=int(ddp["workers"]), cpu=float(ddp["cpu"]), gpu=float(ddp["gpu"]),
            storage=ddp.get("storage"), lr=lr, lr_scale=lr_scale, checkpoint=checkpoint, callbacks=callbacks,
            data=data)
