"""Validating a whole composed config before any data is touched, and the mapping from it to
the model builder's arguments.

Stage and task functions are the only code that sees the whole config; they call
`prepare(cfg)` first, which validates every value and makes every path absolute, so a
bad config fails before any data is read or any MLflow run is created, and Ray trials do
not depend on their working directory. Each group's own module checks its part (the model
registry dry-builds the network, the optimizer and scheduler tables dry-build theirs, each
regularizer entry checks its key), so a new option is validated by the same code that builds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import (
    check_bool,
    check_choice,
    check_number,
    get_required,
    open_dict,
    resolve_paths,
    to_container,
)
from pipeline.errors import ConfigError


def validate(cfg: DictConfig) -> None:
    """Check every value the pipeline reads, before any data is touched.

    Each group's own module checks its part (the model registry dry-builds the network,
    the optimizer and scheduler tables dry-build theirs, each regularizer entry checks its
    key), so a new option is validated by the same code that builds it.
    """
    from pipeline.data.sources import list_sources
    from pipeline.training.optim import validate_optimizer
    from pipeline.training.regularizers import check_regularizers
    from pipeline.training.schedules import validate_scheduler

    check_number(cfg, "seed", integer=True, low=0)
    check_choice(cfg, "data.name", list_sources())
    check_number(cfg, "data.channels", integer=True, low=1)
    check_number(cfg, "data.image_size", integer=True, low=1)
    check_number(cfg, "data.num_classes", integer=True, low=2, optional=cfg.data.name == "imagefolder")
    check_number(cfg, "data.resize", integer=True, low=1, optional=True)
    check_bool(cfg, "data.normalize")
    check_number(cfg, "data.batch_size", integer=True, low=1)
    check_number(cfg, "data.eval_batch_size", integer=True, low=1)
    check_number(cfg, "data.num_workers", integer=True, low=0)
    check_number(cfg, "data.split.val_fraction", low=0, high=1, high_open=True)
    check_number(cfg, "data.split.test_fraction", low=0, high=1, high_open=True)
    check_number(cfg, "data.split.folds", integer=True, low=2)
    check_number(cfg, "data.split.seed", integer=True, low=0)
    check_number(cfg, "data.fold", integer=True, low=0, high=cfg.data.split.folds - 1, optional=True)
    if cfg.data.split.val_fraction + cfg.data.split.test_fraction >= 1:
        raise ConfigError("data.split.val_fraction + data.split.test_fraction must be < 1.")
    if cfg.data.name == "imagefolder":
        get_required(cfg, "data.path")

    check_number(cfg, "trainer.max_epochs", integer=True, low=1)
    check_number(cfg, "trainer.gradient_clip_val", low=0, low_open=True, optional=True)
    _check_resume(cfg)

    check_bool(cfg, "cv.parallel")
    check_number(cfg, "cv.cpus_per_fold", integer=True, low=1)
    check_number(cfg, "cv.confidence", low=0, high=1, low_open=True, high_open=True)

    check_choice(cfg, "compare.metric", ["val/acc", "val/loss", "test/acc", "test/loss", "test/f1_macro"])
    check_number(cfg, "compare.alpha", low=0, high=1, low_open=True, high_open=True)
    check_bool(cfg, "compare.higher_is_better")
    grid = get_required(cfg, "compare.grid")
    if not OmegaConf.is_list(grid) or not grid or not all(OmegaConf.is_dict(e) for e in grid):
        raise ConfigError("compare.grid must be a list of {key: [alternatives]}, "
                          "e.g. [{model: [mlp, lenet5]}, {regularizer: [none, dropout]}].")

    check_bool(cfg, "tracking.enabled")
    check_bool(cfg, "tracking.log_model")
    if not isinstance(get_required(cfg, "tracking.tracking_uri"), str):
        raise ConfigError("tracking.tracking_uri must be a URI string, e.g. sqlite:///mlflow.db or http://127.0.0.1:5000.")

    check_regularizers(get_required(cfg, "regularizer"))
    from pipeline.models.init import INITS

    check_choice(cfg, "init.scheme", ["default", *INITS])
    check_number(cfg, "init.std", low=0, low_open=True)
    source = get_required(cfg, "transfer.source")
    if source is not None and not isinstance(source, str):
        raise ConfigError(f"transfer.source must be a path or URI string, got {source!r}.")
    if not OmegaConf.is_list(get_required(cfg, "transfer.freeze")):
        raise ConfigError("transfer.freeze must be a list of parameter-name prefixes, e.g. [features].")
    check_number(cfg, "transfer.pretrained_lr_ratio", low=0)
    _validate_model(cfg)
    validate_optimizer(dict(cfg.optimizer))
    validate_scheduler(dict(cfg.scheduler), max_epochs=cfg.trainer.max_epochs)


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


def _validate_model(cfg: DictConfig) -> None:
    import torch

    from pipeline.models import create_model, list_models

    check_choice(cfg, "model.name", list_models())
    if "dropout" in cfg.model:
        check_number(cfg, "model.dropout", low=0, high=1, high_open=True)
    if "batch_norm" in cfg.model and not isinstance(cfg.model.batch_norm, str):
        check_bool(cfg, "model.batch_norm")
    # Dry-build on the meta device: catches bad kwargs and inputs too small for the design
    # in milliseconds, without allocating weights.
    with torch.device("meta"):
        create_model(**model_args(cfg, num_classes=cfg.data.num_classes or 2))


def model_args(cfg: DictConfig, *, num_classes: int) -> dict[str, Any]:
    """Keyword arguments for `create_model` from the config (the one place that maps them)."""
    from pipeline.models import model_defaults
    from pipeline.training.regularizers import Regularizers

    kwargs = {k: v for k, v in to_container(cfg.model).items() if k != "name"}
    # Regularizers that are model options override the model's own values when set (null keeps
    # them). Switching off an option the model does not have (regularizer=none on an MLP without
    # conv dropout) asks for nothing; switching it on is the builder's error, naming the option.
    accepted = model_defaults(cfg.model.name)
    kwargs.update({k: v for k, v in Regularizers(cfg.regularizer).model_kwargs().items()
                   if k in accepted or v not in (0, False)})
    return dict(name=cfg.model.name, in_channels=int(cfg.data.channels), num_classes=int(num_classes),
                image_size=int(cfg.data.resize or cfg.data.image_size), **kwargs)


def prepare(cfg: DictConfig) -> DictConfig:
    """Validate and make paths absolute: the first call of every stage and task."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err)) from err
    cfg = _complete_regularizer(cfg)
    validate(cfg)
    cfg = resolve_paths(cfg)
    if cfg.trainer.get("resume_from") is not None:
        with open_dict(cfg):
            cfg.trainer.resume_from = str(Path(cfg.trainer.resume_from).expanduser().resolve())
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
