"""The train task: fit a registry model with Lightning on the train split, select by val/acc."""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.config import flatten, to_container
from pipeline.data.datamodule import ArrayDataModule
from pipeline.errors import ConfigError
from pipeline.files import write_text, write_with
from pipeline.layout import Layout
from pipeline.models import count_macs, count_parameters
from pipeline.models.checkpoints import load_file
from pipeline.models.transfer import describe, freeze, load_state, transfer_weights
from pipeline.quiet import quiet
from pipeline.reports.figures import learning_curves_png
from pipeline.tasks.common import (
    TrainingData,
    dataset_inputs,
    load_data,
    write_json,
    write_run_file,
)
from pipeline.tracking.mlflow_run import TrackedRun, scoped_tracking_uri, tracking_target
from pipeline.tracking.recorded import RecordedRun
from pipeline.tracking.server import check_tracking
from pipeline.tracking.system import system_metrics
from pipeline.training.builders import (
    build_datamodule,
    build_module,
    build_trainer,
    input_stats,
    speed_up,
)
from pipeline.training.callbacks import (
    BestCheckpoint,
    EpochRecorder,
    EvolutionCheckpoints,
    RandomState,
)
from pipeline.training.fit import fit
from pipeline.training.metrics import best_epoch, file_row
from pipeline.training.module import Classifier
from pipeline.training.schedules import MULTIPLIERS, lr_multiplier
from pipeline.tuning.best import apply_best
from pipeline.validation import model_args, prepare

log = logging.getLogger(__name__)


def train(cfg: DictConfig, *, callbacks: Sequence[Callback] = (), parent_run_id: str | None = None,
          run_tags: dict[str, str] | None = None, ckpt_path: str | None = None,
          trainer_kwargs: dict[str, Any] | None = None, figures: bool = True,
          record: RecordedRun | None = None, data: TrainingData | None = None) -> dict[str, float]:
    """Train one model as configured; returns the best epoch's metrics (keys like `val/acc`).

    Writes `models/{best,last}.ckpt`, `models/run.json`, `metrics/train.json` and the
    per-epoch curves in `plots/`, and tracks everything in one MLflow run.
    `callbacks` are added to the Trainer's (a Ray Tune trial adds its reporter),
    `ckpt_path` resumes from a Lightning checkpoint (else `trainer.resume_from`, checked
    against the configured model first), and `trainer_kwargs` override
    Trainer arguments (a Ray Train worker passes its DDP strategy and environment).
    `figures=False` skips the learning-curve PNG (a Tune trial: ~0.5 s of matplotlib per
    trial, and the sweep draws all trials' curves in one figure anyway).
    With `record`, the run's MLflow calls go there instead of the store (a parallel
    cross-validation fold: the CV driver writes them; `models/run.json` is then its to write).
    `data` is what `load_data` read for a driver (a sweep's, a parallel CV's): the run then
    reads nothing from the data folders, which need not exist where it runs.
    With `tune.use_best`, the best sweep trial's overrides (`results/tune/best.yaml`) apply first.
    """
    cfg, tuned_tags = apply_best(cfg)
    cfg = prepare(cfg)
    if "tuned_max_epochs" in tuned_tags:
        mismatch = budget_mismatch(cfg, int(tuned_tags["tuned_max_epochs"]))
        if mismatch:
            log.warning(mismatch)
    if record is None:  # a recorded run (a parallel fold) never talks to the server
        check_tracking(cfg.tracking, cfg.paths.root)
    quiet()
    layout = Layout.from_cfg(cfg)
    data = load_data(cfg, layout, data)
    raw, splits = data.raw, data.splits
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # With data.fold set (cross-validation), fold i validates and the other folds train;
    # the test split is never touched by either.
    train_idx, val_idx = splits.fold(cfg.data.fold) if cfg.data.fold is not None else (splits.train, splits.val)
    dm = build_datamodule(raw.images, raw.labels, cfg.data, train_idx=train_idx, val_idx=val_idx,
                          test_idx=splits.test, seed=cfg.seed)
    module = configured_module(cfg, dm, num_classes=len(raw.classes))
    transfer_tags = _transfer(module, cfg.transfer, cfg.tracking, cfg.paths.root) if cfg.transfer.source else {}
    input_shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    size = {"model/params": count_parameters(module.net), "model/macs": count_macs(module.net, input_shape)}
    speed_up(module, cfg.trainer)  # after the count, which runs the network once, eagerly
    resolved = to_container(cfg)
    resume_tags = {}
    if ckpt_path is None and cfg.trainer.get("resume_from") is not None:
        ckpt_path = _resumable(cfg.trainer.resume_from, module, layout)
        resume_tags = {"resumed_from": ckpt_path}
    _start_outputs(layout, resolved, train_idx, val_idx)

    run_tags = {**transfer_tags, **tuned_tags, **resume_tags, **(run_tags or {})}
    run = _start_run(cfg, data.tags, parent_run_id, run_tags, record) if cfg.tracking.enabled else None
    with run if run is not None else contextlib.nullcontext():
        if run is not None:
            _log_start(run, layout, resolved, module.hparams["arch"], size)
            fold = "" if cfg.data.fold is None else f"-fold{cfg.data.fold}"
            run.log_inputs(dataset_inputs(layout, data, cfg.data.name, {"training": (f"train{fold}", train_idx),
                                                                       "validation": (f"val{fold}", val_idx)}))
        recorder = EpochRecorder(run)
        # Saved at the end of the epoch, after the recorder's row (Lightning runs checkpoint
        # callbacks last), so a checkpoint holds the curves up to its own epoch: a run resumed
        # from it repeats no epoch and misses none.
        checkpoint = BestCheckpoint(dirpath=layout.models, filename="best", monitor=cfg.optimized_metric, mode="max",
                                    save_last=True, enable_version_counter=False, auto_insert_metric_name=False,
                                    save_on_train_epoch_end=True)
        cbs: list[Callback] = [recorder, checkpoint, RandomState(), *callbacks]
        evolution = None
        if cfg.report.evolution_epochs:  # off by default: no file, no time
            evolution = EvolutionCheckpoints(layout.evolution, list(cfg.report.evolution_epochs))
            cbs.append(evolution)
        cbs += module.regularizers.callbacks(monitor=cfg.optimized_metric, mode="max")  # e.g. early stopping
        trainer = build_trainer(cfg.trainer, cbs, root_dir=cfg.paths.out_dir, **(trainer_kwargs or {}))
        start = time.perf_counter()
        # Not trainer.fit: a stop signal must raise, never return as if training had ended.
        # A resumed trial's checkpoint may sit on shared storage (tune.storage_path): read it
        # weights-only like every checkpoint (pipeline.models.checkpoints).
        with system_metrics(run if cfg.tracking.system_metrics else None, cfg.tracking.system_metrics_interval_s):
            fit(trainer, module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        elapsed = time.perf_counter() - start

        metrics = _summary(recorder.rows, cfg.optimized_metric, size, elapsed)
        _write_outputs(layout, recorder.rows, metrics, figures=figures)
        if run is not None:
            run.log_metrics({f"best/{k}": v for k, v in metrics.items() if k.startswith(("train/", "val/"))})
            run.log_metrics({"time/train_s": elapsed, "epochs": metrics["epochs"]})
            if figures:
                run.log_artifact(layout.plots / "learning_curves.png")
            run.log_artifact(layout.metrics / "train.json")
            for path in evolution.saved if evolution is not None else []:
                run.log_artifact(path, "evolution")  # so a report on the run finds them anywhere
            if recorder.diverged:
                run.set_tags({"diverged": "true"})
    return metrics


def budget_mismatch(cfg: DictConfig, tuned_epochs: int) -> str | None:
    """What is wrong when this run's epoch budget is not the one the sweep tuned at (None if it is).

    The tuned values (learning rate, decay, dropout, ...) won among trials of `tuned_epochs`
    epochs; applied over another budget, the schedule runs where no trial went (or stops
    before where they went), and the sweep's ranking says nothing about that run.
    """
    epochs = int(cfg.trainer.max_epochs)
    if epochs == tuned_epochs:
        return None
    sched = {k: v for k, v in to_container(cfg.scheduler).items() if k != "name"}
    name = cfg.scheduler.name
    shape = ""
    if name in MULTIPLIERS and name != "none":
        f = lr_multiplier(name, max_epochs=epochs, **sched)
        g = lr_multiplier(name, max_epochs=tuned_epochs, **sched)
        shape = (f" (learning rate x{g(tuned_epochs - 1):.3g} of its start at the trials' last epoch, "
                 f"x{f(epochs - 1):.3g} at this run's)")
    how = (f"stretches the {name} learning-rate schedule tuned for a shorter run{shape}"
           if epochs > tuned_epochs else f"cuts short the {name} learning-rate schedule the sweep tuned{shape}")
    return (f"This run trains up to {epochs} epochs (trainer.max_epochs) with hyperparameters a sweep chose "
            f"among {tuned_epochs}-epoch trials (tune.max_epochs): it {how}, and the sweep did not test them "
            f"at this budget. Tune at it (tune.max_epochs={epochs}; by default tune.max_epochs follows "
            f"trainer.max_epochs), train at the sweep's (trainer.max_epochs={tuned_epochs}), "
            "or ignore the sweep (tune.use_best=false).")


def configured_module(cfg: DictConfig, dm: ArrayDataModule, *, num_classes: int) -> Classifier:
    """The LightningModule `cfg` describes, standardising its input by `dm`'s training images."""
    mean, std = input_stats(dm, cfg.data)
    args = model_args(cfg, num_classes=num_classes)
    arch = args.pop("name")
    return build_module(arch, args, mean=mean, std=std, resize=cfg.data.resize, optimizer=cfg.optimizer,
                        scheduler=cfg.scheduler, regularizer=cfg.regularizer, init=cfg.init, seed=cfg.seed)


def _resumable(path: str, module: Classifier, layout: Layout) -> str:
    """`path` if it is a training checkpoint of the model `module` is (else a user error)."""
    if Path(path) in (layout.last_ckpt, layout.best_ckpt):
        raise ConfigError(f"trainer.resume_from={path} is this run's own output, which training replaces: copy it "
                          "elsewhere and resume from the copy.")
    saved = load_file(path)  # weights-only, as Lightning then reads it
    if not isinstance(saved, dict) or "loops" not in saved or "state_dict" not in saved:
        raise ConfigError(f"trainer.resume_from={path} is not a Lightning training checkpoint: give a run's "
                          "models/last.ckpt (or best.ckpt).")
    hparams, want = saved.get("hyper_parameters", {}), module.hparams
    if (hparams.get("arch"), hparams.get("arch_kwargs")) != (want["arch"], want["arch_kwargs"]):
        raise ConfigError(f"trainer.resume_from={path} holds a {hparams.get('arch')} {hparams.get('arch_kwargs')}, "
                          f"but this config builds a {want['arch']} {want['arch_kwargs']}: resume with the overrides of "
                          "the run that wrote the checkpoint.")
    return path


def _start_outputs(layout: Layout, resolved: dict, train_idx: np.ndarray, val_idx: np.ndarray) -> None:
    for stale in (layout.best_ckpt, layout.last_ckpt):
        stale.unlink(missing_ok=True)  # else Lightning would write best-v1.ckpt beside it
    layout.run_file.unlink(missing_ok=True)  # it names the run of the checkpoints just removed
    if layout.evolution.is_dir():  # another run's epochs (or ones this config no longer keeps)
        shutil.rmtree(layout.evolution)
    for partial in layout.models.glob(".*.tmp"):  # a write cut short by SIGKILL (pipeline.files)
        partial.unlink(missing_ok=True)
    layout.models.mkdir(parents=True, exist_ok=True)
    write_text(layout.models / "config.yaml", OmegaConf.to_yaml(resolved))
    # Which samples trained and validated this model: lets anyone audit for leakage.
    write_with(layout.models / "indices.npz", lambda f: np.savez(f, train=train_idx, val=val_idx))


def _log_start(run: TrackedRun, layout: Layout, resolved: dict, arch: str, size: dict[str, int]) -> None:
    run.log_params(flatten(resolved))
    run.log_params({"model.arch": arch, **size})
    run.log_metrics(size)
    run.log_artifact(layout.models / "config.yaml")
    if run.run_id is not None:  # a recorded run has no id until the driver writes it
        write_run_file(layout, run)


def _transfer(module: Classifier, transfer: DictConfig, tracking: DictConfig, root: str) -> dict[str, str]:
    """Load pretrained weights into the network, freeze, and set the fine-tuning lr groups.
    An MLflow source (`runs:/`, `models:/<name>@champion`) is read from the configured store."""
    net = module.net[1]
    with scoped_tracking_uri(tracking_target(tracking, root)["tracking_uri"]):
        state = load_state(transfer.source)
    loaded = transfer_weights(net, state, source=transfer.source, arch=module.hparams["arch"])
    frozen = freeze(net, transfer.freeze)
    module.pretrained = (loaded, float(transfer.pretrained_lr_ratio))
    # On the console, as the tuned hyperparameters' note (tuning.best): a run's starting point.
    print(describe(net, transfer.source, loaded, frozen, transfer.freeze), flush=True)
    return {"transfer_source": transfer.source, "transfer_loaded": str(len(loaded)),
            "transfer_frozen": str(len(frozen))}


def _start_run(cfg: DictConfig, data_tags: dict[str, str], parent_run_id: str | None,
               extra_tags: dict[str, str] | None, record: RecordedRun | None = None) -> TrackedRun:
    target = tracking_target(cfg.tracking, cfg.paths.root)
    tags = {"dataset": cfg.data.name, "model": cfg.model.name, "config_name": cfg.name, **data_tags,
            **(extra_tags or {})}
    run_name = cfg.tracking.run_name or f"{cfg.name}-{cfg.model.name}-{cfg.data.name}"
    if record is not None:
        return record.begin(run_name=run_name, tags=tags, parent_run_id=parent_run_id)
    return TrackedRun.start(**target, run_name=run_name, tags=tags, parent_run_id=parent_run_id)


def _summary(rows: list[dict], monitor: str, size: dict, elapsed: float) -> dict[str, float]:
    """The best epoch's figures by the monitored metric, ties to the lower validation loss (what
    the best checkpoint holds)."""
    scored = [r for r in rows if monitor in r]
    ties = [r.get("val/loss", math.inf) for r in scored]
    best = scored[best_epoch([r[monitor] for r in scored], ties)] if scored else (rows[-1] if rows else {"epoch": -1})
    out = {k: v for k, v in best.items() if k.startswith(("train/", "val/"))}
    out.update({"best_epoch": best["epoch"], "epochs": len(rows), "time/train_s": elapsed, **size})
    return out


def _write_outputs(layout: Layout, rows: list[dict], metrics: dict[str, float], *, figures: bool) -> None:
    # Spelled as every DVC file spells metrics (`val_acc`, `model_macs`), so `dvc metrics show`
    # has one column per quantity across train.json, test.json and cv.json.
    write_json(layout.metrics / "train.json", file_row(metrics))
    write_json(layout.plots / "train_curves.json", [file_row(r) for r in rows])
    if figures:
        learning_curves_png(rows, layout.plots / "learning_curves.png")


