"""Validating a whole composed config before any data is touched, and the mapping from it to
the model builder's arguments.

Stage and task functions are the only code that sees the whole config; they call
`prepare(cfg)` first, which validates every value and makes every path absolute, so a
bad config fails before any data is read or any MLflow run is created, and Ray trials do
not depend on their working directory. Each group's own module checks its part (the model
registry dry-builds the network, the optimizer and scheduler tables dry-build theirs, each
regularizer entry checks its key), so a new option is validated by the same code that builds
it. The data stages, which build no model, leave those groups to the stages that do
(`prepare(models=False)`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import (
    check_auto_bool,
    check_bool,
    check_choice,
    check_keys,
    check_number,
    get_required,
    open_dict,
    resolve_paths,
    to_container,
)
from pipeline.errors import ConfigError

# The keys of each block read key by key, so that a typo (or a `+key=...` that nothing reads)
# fails instead of leaving the intended key at its default. The model, optimizer, scheduler
# and regularizer blocks are checked by the code that builds them; `tune.space` and
# `tune.fixed` are open mappings, checked by the sweep's plan.
KEYS: dict[str, tuple[str, ...]] = {
    "": ("name", "seed", "optimized_metric", "data", "model", "optimizer", "scheduler", "trainer", "tracking",
         "regularizer", "cv", "compare", "init", "transfer", "tune", "report", "paths"),
    "data": ("name", "channels", "image_size", "num_classes", "path", "resize", "normalize", "batch_size",
             "eval_batch_size", "num_workers", "in_memory", "device_cache", "download", "fold", "split"),
    "data.split": ("val_fraction", "test_fraction", "folds", "seed"),
    "trainer": ("max_epochs", "accelerator", "devices", "precision", "channels_last", "compile", "deterministic",
                "gradient_clip_val", "limit_train_batches", "limit_val_batches", "enable_progress_bar", "resume_from"),
    "tracking": ("enabled", "tracking_uri", "artifact_location", "experiment_name", "run_name", "log_model",
                 "register", "system_metrics", "system_metrics_interval_s"),
    "cv": ("parallel", "cpus_per_fold", "confidence", "repeats", "nested", "inner_folds"),
    "compare": ("grid", "metric", "higher_is_better", "alpha", "test"),
    "init": ("scheme", "std"),
    "transfer": ("source", "freeze", "pretrained_lr_ratio"),
    "paths": ("root", "data_dir", "download_dir", "out_dir"),
    "report": ("projection", "evolution_epochs"),
    "tune": ("name", "space", "fixed", "num_samples", "search_alg", "scheduler", "asha", "hyperband", "pbt", "metric",
             "mode", "max_epochs", "max_concurrent_trials", "resources", "workers", "num_cpus", "address",
             "storage_path", "time_budget_s", "max_failures", "resume", "use_best", "cv", "objectives",
             "selection", "system_metrics"),
    "tune.asha": ("grace_period", "reduction_factor", "brackets"),
    "tune.hyperband": ("reduction_factor",),
    "tune.pbt": ("perturbation_interval", "quantile_fraction", "resample_probability", "mutate"),
    "tune.resources": ("cpu", "gpu"),
    "tune.selection": ("alpha", "tie_break"),
}
# The tests `compare.test` may pick: those of pipeline.analysis.stats.TESTS (which sits above
# this module; a test checks the two agree).
COMPARE_TESTS = ("corrected_t", "paired_t", "wilcoxon", "five_by_two")
# How the report projects activations to pixels (pipeline.reports.projection takes them from here).
PROJECTIONS = ("deconvnet", "guided_backprop")
# A model block's key that is no builder argument: the input size its design is meant for.
INPUT_SIZE = "input_size"
# Checkpoints and early stopping keep the epoch where it is highest.
OPTIMIZED_METRICS = ("val/acc", "train/acc")


def validate(cfg: DictConfig, *, trains: bool = True, models: bool = True) -> None:
    """Check every value the pipeline reads, before any data is touched.

    Each group's own module checks its part (the model registry dry-builds the network,
    the optimizer and scheduler tables dry-build theirs unless `trains` is false, each
    regularizer entry checks its key), so a new option is validated by the same code that
    builds it. `models=False` leaves those groups (model, optimizer, scheduler, regularizer,
    init) to the stages that build a model: their registries are torch modules.
    """
    from pipeline.data.residency import check_device_cache, check_in_memory
    from pipeline.data.sources import list_sources

    for block, known in KEYS.items():
        check_keys(cfg, block, known)
    _check_string(cfg, "name")
    check_number(cfg, "seed", integer=True, low=0)
    check_choice(cfg, "optimized_metric", OPTIMIZED_METRICS)
    check_choice(cfg, "data.name", list_sources())
    check_number(cfg, "data.channels", integer=True, low=1)
    check_number(cfg, "data.image_size", integer=True, low=1)
    check_number(cfg, "data.num_classes", integer=True, low=2, optional=cfg.data.name == "imagefolder")
    check_number(cfg, "data.resize", integer=True, low=1, optional=True)
    check_bool(cfg, "data.normalize")
    check_bool(cfg, "data.download")
    check_number(cfg, "data.batch_size", integer=True, low=1)
    check_number(cfg, "data.eval_batch_size", integer=True, low=1)
    check_number(cfg, "data.num_workers", integer=True, low=0)
    check_in_memory(get_required(cfg, "data.in_memory"))
    check_device_cache(get_required(cfg, "data.device_cache"))
    check_number(cfg, "data.split.val_fraction", low=0, high=1, high_open=True)
    check_number(cfg, "data.split.test_fraction", low=0, high=1, high_open=True)
    check_number(cfg, "data.split.folds", integer=True, low=2)
    check_number(cfg, "data.split.seed", integer=True, low=0)
    check_number(cfg, "cv.repeats", integer=True, low=1)
    # With repetitions, data.fold counts through every repetition's folds (rep * folds + i).
    check_number(cfg, "data.fold", integer=True, low=0, high=cfg.data.split.folds * cfg.cv.repeats - 1, optional=True)
    if cfg.data.split.val_fraction + cfg.data.split.test_fraction >= 1:
        raise ConfigError("data.split.val_fraction + data.split.test_fraction must be < 1.")
    if cfg.data.name == "imagefolder":
        get_required(cfg, "data.path")

    _validate_trainer(cfg)
    _check_resume(cfg)

    check_auto_bool(get_required(cfg, "cv.parallel"), "cv.parallel",
                    "auto runs the folds as parallel Ray tasks where two fit at once (on a cluster, or here with "
                    "2 x cv.cpus_per_fold CPUs); true or false forces it.")
    check_number(cfg, "cv.cpus_per_fold", integer=True, low=1)
    check_number(cfg, "cv.confidence", low=0, high=1, low_open=True, high_open=True)
    check_bool(cfg, "cv.nested")
    check_number(cfg, "cv.inner_folds", integer=True, low=2)

    check_choice(cfg, "compare.metric", ["val/acc", "val/loss", "test/acc", "test/loss", "test/f1_macro"])
    check_number(cfg, "compare.alpha", low=0, high=1, low_open=True, high_open=True)
    check_bool(cfg, "compare.higher_is_better")
    check_choice(cfg, "compare.test", COMPARE_TESTS)
    grid = get_required(cfg, "compare.grid")
    if not OmegaConf.is_list(grid) or not grid or not all(OmegaConf.is_dict(e) for e in grid):
        raise ConfigError("compare.grid must be a list of {key: [alternatives]}, "
                          "e.g. [{model: [mlp, lenet5]}, {regularizer: [none, dropout]}].")

    check_bool(cfg, "tracking.enabled")
    check_bool(cfg, "tracking.log_model")
    register = cfg.tracking.get("register")
    if register not in (None, True, False):
        raise ConfigError(f"tracking.register must be true, false or null (on in the DVC pipeline only), got {register!r}.")
    if register is True and not cfg.tracking.log_model:
        raise ConfigError("tracking.register=true registers the logged model, but tracking.log_model=false logs none: "
                          "set tracking.log_model=true, or tracking.register=false.")
    check_bool(cfg, "tracking.system_metrics")
    check_number(cfg, "tracking.system_metrics_interval_s", low=0.1)
    if not isinstance(get_required(cfg, "tracking.tracking_uri"), str):
        raise ConfigError("tracking.tracking_uri must be a URI string, e.g. sqlite:///mlflow.db or http://127.0.0.1:5000.")
    _check_string(cfg, "tracking.experiment_name")
    _check_string(cfg, "tracking.run_name", optional=True)
    _check_string(cfg, "tracking.artifact_location", optional=True)

    source = get_required(cfg, "transfer.source")
    if source is not None and not isinstance(source, str):
        raise ConfigError(f"transfer.source must be a path or URI string, got {source!r}.")
    if not OmegaConf.is_list(get_required(cfg, "transfer.freeze")):
        raise ConfigError("transfer.freeze must be a list of parameter-name prefixes, e.g. [features].")
    check_number(cfg, "transfer.pretrained_lr_ratio", low=0)
    _validate_report(cfg)
    if models:
        _validate_builders(cfg, trains=trains)


def _validate_builders(cfg: DictConfig, *, trains: bool) -> None:
    """The groups whose own code builds what they name, checked by that code."""
    from pipeline.models.init import INITS
    from pipeline.training.optim import validate_optimizer
    from pipeline.training.regularizers import check_regularizers
    from pipeline.training.schedules import validate_scheduler

    check_regularizers(get_required(cfg, "regularizer"))
    check_choice(cfg, "init.scheme", ["default", *INITS])
    check_number(cfg, "init.std", low=0, low_open=True)
    _validate_model(cfg)
    validate_optimizer(dict(cfg.optimizer), dry_build=trains)
    validate_scheduler(dict(cfg.scheduler), max_epochs=cfg.trainer.max_epochs, dry_build=trains)


def _validate_report(cfg: DictConfig) -> None:
    check_choice(cfg, "report.projection", PROJECTIONS)
    epochs = get_required(cfg, "report.evolution_epochs")
    items = list(epochs) if OmegaConf.is_list(epochs) else None
    if items is None or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in items) \
            or len(set(items)) != len(items):
        raise ConfigError(f"report.evolution_epochs={epochs!r} must be a list of distinct epoch numbers >= 1 (1: after "
                          "the first epoch), e.g. [1, 2, 5, 10], or [] to keep no per-epoch checkpoints.")


def _check_resume(cfg: DictConfig) -> None:
    """`trainer.resume_from` names an existing file (relative paths: from the working directory)."""
    resume = cfg.trainer.get("resume_from")
    if resume is None:
        return
    if not isinstance(resume, str) or not resume:
        raise ConfigError(f"trainer.resume_from must be the path of a checkpoint file, got {resume!r}.")
    if not Path(resume).expanduser().is_file():
        raise ConfigError(f"trainer.resume_from={resume!r}: no such file. Give the checkpoint of a stopped run, "
                          "e.g. outputs/<date>/<time>/models/last.ckpt, or drop the override to train from scratch.")


def refuse_resume(cfg: DictConfig, job: str) -> None:
    """Jobs that train many models (sweeps, cross-validation, comparisons) start each from
    scratch: `trainer.resume_from` belongs to one `pipeline train` run."""
    if cfg.trainer.get("resume_from") is not None:
        raise ConfigError(f"trainer.resume_from continues one `pipeline train` run; {job} trains every model from "
                          "scratch: drop the override.")


PRECISIONS = ("32-true", "32", 32, "64-true", "64", 64, "16-mixed", "16-true", "16", 16, "bf16-mixed",
              "bf16-true", "bf16")  # Lightning's


def _validate_trainer(cfg: DictConfig) -> None:
    """The `trainer` section, which Lightning would refuse only once the run has started."""
    check_number(cfg, "trainer.max_epochs", integer=True, low=1)
    check_number(cfg, "trainer.gradient_clip_val", low=0, low_open=True, optional=True)
    check_choice(cfg, "trainer.accelerator", ["auto", "cpu", "gpu", "cuda", "mps"])
    precision = get_required(cfg, "trainer.precision")
    if precision not in PRECISIONS or isinstance(precision, bool):
        raise ConfigError(f"trainer.precision={precision!r} is not one of: "
                          f"{', '.join(p for p in PRECISIONS if isinstance(p, str))}.")
    if str(precision).startswith("16") and _on_cpu(get_required(cfg, "trainer.accelerator")):
        raise ConfigError(f"trainer.precision={precision} needs a CUDA GPU (float16), and this run trains on "
                          "the CPU: use trainer.precision=bf16-mixed, which trains on CPUs too, or 32-true.")
    check_bool(cfg, "trainer.channels_last")
    check_bool(cfg, "trainer.compile")
    devices = get_required(cfg, "trainer.devices")
    count = isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)
    indices = OmegaConf.is_list(devices) and len(devices) > 0 and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    if not (devices == "auto" or count or indices):
        raise ConfigError(f"trainer.devices={devices!r} must be auto, a count (-1: all) or a list of device indices.")
    if get_required(cfg, "trainer.deterministic") != "warn":
        check_bool(cfg, "trainer.deterministic")
    check_bool(cfg, "trainer.enable_progress_bar")
    for key in ("trainer.limit_train_batches", "trainer.limit_val_batches"):
        # A count of batches per epoch, or a fraction of them; none would leave nothing to
        # train on, or nothing to select the best epoch by.
        value = check_number(cfg, key, low=0, low_open=True, optional=True)
        if isinstance(value, float) and value > 1:
            raise ConfigError(f"{key}={value} must be a count of batches (an integer) or a fraction <= 1.")


def _on_cpu(accelerator: str) -> bool:
    """Whether `trainer.accelerator` trains on the CPU here (auto: no CUDA or MPS device)."""
    import torch

    if accelerator == "cpu":
        return True
    return accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()


def _check_string(cfg: DictConfig, key: str, *, optional: bool = False) -> None:
    value = get_required(cfg, key)
    if not (isinstance(value, str) and value) and not (optional and value is None):
        raise ConfigError(f"{key} must be a {'string or null' if optional else 'non-empty string'}, got {value!r}.")


def _validate_model(cfg: DictConfig) -> None:
    import torch

    from pipeline.models import create_model, list_models, model_defaults
    from pipeline.models.layers import NORMS

    name = check_choice(cfg, "model.name", list_models())
    check_keys(cfg, "model", ["name", INPUT_SIZE, *model_defaults(name)])
    if INPUT_SIZE in cfg.model:
        check_number(cfg, f"model.{INPUT_SIZE}", integer=True, low=1, optional=True)
    if "dropout" in cfg.model:
        check_number(cfg, "model.dropout", low=0, high=1, high_open=True)
    if "batch_norm" in cfg.model and not isinstance(cfg.model.batch_norm, str):
        check_bool(cfg, "model.batch_norm")
    elif "batch_norm" in cfg.model:  # a norm by name, from the layers' table
        norms = sorted({n for n, _ in NORMS})
        if cfg.model.batch_norm.lower() not in norms:
            raise ConfigError(f"model.batch_norm={cfg.model.batch_norm!r} is not a norm: use true, false or one "
                              f"of {', '.join(norms)}.")
    # Dry-build on the meta device: catches bad kwargs and inputs too small for the design
    # in milliseconds, without allocating weights.
    try:
        with torch.device("meta"):
            create_model(**model_args(cfg, num_classes=cfg.data.num_classes or 2))
    except ConfigError as err:
        # The layers name the option or the value they refuse ("Unknown activation 'swishy'"),
        # not the key: name the model key it is.
        named = [k for k, v in cfg.model.items() if k != "name" and (
            (isinstance(v, str) and repr(v) in str(err)) or re.search(rf"\b{re.escape(str(k))}\b", str(err)))]
        if str(err).startswith(("model.", "regularizer.")) or not named:
            raise
        raise ConfigError(f"model.{named[0]}={cfg.model[named[0]]!r}: {err}") from err


def model_args(cfg: DictConfig, *, num_classes: int) -> dict[str, Any]:
    """Keyword arguments for `create_model` from the config (the one place that maps them)."""
    from pipeline.models import model_defaults
    from pipeline.training.regularizers import Regularizers

    kwargs = {k: v for k, v in to_container(cfg.model).items() if k not in ("name", INPUT_SIZE)}
    # Regularizers that are model options override the model's own values when set (null keeps
    # them). Switching off an option the model does not have (regularizer=none on an MLP without
    # conv dropout) asks for nothing; switching it on is the builder's error, naming the option.
    accepted = model_defaults(cfg.model.name)
    kwargs.update({k: v for k, v in Regularizers(cfg.regularizer).model_kwargs().items()
                   if k in accepted or v not in (0, False)})
    return dict(name=cfg.model.name, in_channels=int(cfg.data.channels), num_classes=int(num_classes),
                image_size=int(cfg.data.resize or cfg.data.image_size), **kwargs)


def prepare(cfg: DictConfig, *, trains: bool = True, models: bool = True) -> DictConfig:
    """Validate and make paths absolute: the first call of every stage and task. `trains=False`
    (a stage that never trains: fetch, split, evaluate, report) checks the optimizer and
    schedule settings without building them: the first optimizer a process builds imports
    `torch._dynamo`, a CPU second for nothing there (bench/startup.py). `models=False` (the
    data stages, fetch and split, which build no model) checks every block's keys and the
    values they read and leaves the model, optimizer, schedule and regularizer settings to
    the stages that build a model: their registries import torch, 1.8 s a stage here."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err)) from err
    if models:
        cfg = _complete_regularizer(cfg)
    cfg = _intended_input(cfg)
    validate(cfg, trains=trains, models=models)
    cfg = resolve_paths(cfg)
    if cfg.trainer.get("resume_from") is not None:
        with open_dict(cfg):
            cfg.trainer.resume_from = str(Path(cfg.trainer.resume_from).expanduser().resolve())
    return cfg


def _intended_input(cfg: DictConfig) -> DictConfig:
    """A copy that resizes to the size the model's design declares (`model.input_size`, e.g.
    LeNet-5's 32 px) when `data.resize` is null: a design judged on inputs it was not built
    for (LeNet-5 on 8x8 digits) loses to one that takes any size, and a comparison would
    measure the input, not the design. An explicit `data.resize` wins; `model.input_size=null`
    keeps the data's own size."""
    model, data = cfg.get("model"), cfg.get("data")
    size = model.get(INPUT_SIZE) if OmegaConf.is_dict(model) else None
    valid = isinstance(size, int) and not isinstance(size, bool) and size >= 1  # else validate names the key
    if not valid or not OmegaConf.is_dict(data) or data.get("resize") is not None or size == data.get("image_size"):
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.data.resize = size
    return cfg


def _complete_regularizer(cfg: DictConfig) -> DictConfig:
    """A copy whose `regularizer` block has every registered key: a regularizer whose key is
    not in conf/config.yaml (only in its conf/regularizer/ option) gets its default, so every
    later reader (training, sweeps, the logged parameters) sees the whole block."""
    from pipeline.training.regularizers import complete

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.regularizer = complete(get_required(cfg, "regularizer"))
    return cfg
