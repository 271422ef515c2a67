"""Loading, composing, path-resolving and validating the configuration.

Stage and task functions are the only code that sees the whole config; they call
`prepare(cfg)` first, which validates every value and makes every path absolute, so a
bad config fails before any data is read or any MLflow run is created, and Ray trials do
not depend on their working directory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError

CONFIG_NAME = "config"
PARAMS_FILE = "params.yaml"


def find_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) holding dvc.yaml, else `start`."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    return start


def config_dir(root: Path | None = None) -> Path:
    """The `conf/` folder: the project's own if present, else the one next to the package source."""
    for candidate in (find_root(root) / "conf", Path(__file__).resolve().parents[2] / "conf"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("No conf/ folder found: run from the project folder (the one with dvc.yaml).")


def compose(overrides: Sequence[str] = (), *, conf: Path | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides, as DVC and the CLI do."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    # Inside a @hydra.main app (e.g. `python -m pipeline.tune` composing group options) Hydra
    # is already initialized: step aside for this composition and put the app's back after.
    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    if outer is not None:
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf or config_dir()), version_base="1.3"):
            return hydra_compose(CONFIG_NAME, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(str(err)) from err
    finally:
        if outer is not None:
            GlobalHydra.instance().initialize(outer)


def load_params(path: Path | str = PARAMS_FILE) -> DictConfig:
    """Read `params.yaml` (the DVC stages' view of the config)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run stages from the project folder, or `dvc exp run` to write it.")
    return OmegaConf.load(path)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- paths

def resolve_paths(cfg: DictConfig) -> DictConfig:
    """Return a copy whose `paths.*` are absolute (relative ones are taken from paths.root)."""
    cfg = cfg.copy()
    root = Path(cfg.paths.root).expanduser().resolve() if cfg.paths.get("root") else find_root()
    with open_dict(cfg):
        cfg.paths.root = str(root)
        for key in ("data_dir", "download_dir", "out_dir"):
            p = Path(str(cfg.paths[key])).expanduser()
            cfg.paths[key] = str(p if p.is_absolute() else (root / p).resolve())
        if cfg.data.get("path") not in (None, "???") and not OmegaConf.is_missing(cfg.data, "path"):
            p = Path(str(cfg.data.path)).expanduser()
            cfg.data.path = str(p if p.is_absolute() else (root / p).resolve())
    return cfg


def open_dict(cfg: DictConfig):
    """Context manager allowing new keys on a struct config."""
    from omegaconf import open_dict as _open_dict

    return _open_dict(cfg)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """A plain resolved dict (for logging, pickling into Ray trials, YAML artifacts)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------- validation

def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{key} is required but not set: add `{key}=...` to the command or config.") from err


def check_number(cfg: DictConfig, key: str, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False,
                 optional: bool = False) -> Any:
    """Check `key` is a number (an int if `integer`) within the interval; the message names the key."""
    value = _get(cfg, key)
    if value is None and optional:
        return None
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool) or (not integer and not math.isfinite(value)):
        raise ConfigError(f"{key} must be {kind}, got {value!r} ({type(value).__name__}).")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        bounds = [f"{'>' if low_open else '>='} {low}"] if low is not None else []
        bounds += [f"{'<' if high_open else '<='} {high}"] if high is not None else []
        raise ConfigError(f"{key}={value} is out of range: it must be {' and '.join(bounds)}.")
    return value


def check_bool(cfg: DictConfig, key: str) -> bool:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    return value


def check_choice(cfg: DictConfig, key: str, choices: Sequence[str]) -> str:
    value = _get(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(sorted(choices))}.")
    return value


def validate(cfg: DictConfig) -> None:
    """Check every value the pipeline reads, before any data is touched.

    Each group's own module checks its part (the model registry dry-builds the network,
    the optimizer and scheduler tables dry-build theirs), so a new option is validated by
    the same code that builds it.
    """
    from pipeline.data.sources import list_sources
    from pipeline.training.optim import validate_optimizer, validate_scheduler

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
        _get(cfg, "data.path")

    check_number(cfg, "trainer.max_epochs", integer=True, low=1)
    check_number(cfg, "trainer.gradient_clip_val", low=0, low_open=True, optional=True)

    check_bool(cfg, "cv.parallel")
    check_number(cfg, "cv.cpus_per_fold", integer=True, low=1)
    check_number(cfg, "cv.confidence", low=0, high=1, low_open=True, high_open=True)

    check_choice(cfg, "compare.metric", ["val/acc", "val/loss", "test/acc", "test/loss", "test/f1_macro"])
    check_number(cfg, "compare.alpha", low=0, high=1, low_open=True, high_open=True)
    check_bool(cfg, "compare.higher_is_better")
    grid = _get(cfg, "compare.grid")
    if not OmegaConf.is_list(grid) or not grid or not all(OmegaConf.is_dict(e) for e in grid):
        raise ConfigError("compare.grid must be a list of {key: [alternatives]}, "
                          "e.g. [{model: [mlp, lenet5]}, {regularizer: [none, dropout]}].")

    check_bool(cfg, "tracking.enabled")
    check_bool(cfg, "tracking.log_model")
    if not isinstance(_get(cfg, "tracking.tracking_uri"), str):
        raise ConfigError("tracking.tracking_uri must be a URI string, e.g. sqlite:///mlflow.db or http://127.0.0.1:5000.")

    _validate_regularizer(cfg)
    from pipeline.models.init import INITS

    check_choice(cfg, "init.scheme", ["default", *INITS])
    check_number(cfg, "init.std", low=0, low_open=True)
    source = _get(cfg, "transfer.source")
    if source is not None and not isinstance(source, str):
        raise ConfigError(f"transfer.source must be a path or URI string, got {source!r}.")
    if not OmegaConf.is_list(_get(cfg, "transfer.freeze")):
        raise ConfigError("transfer.freeze must be a list of parameter-name prefixes, e.g. [features].")
    check_number(cfg, "transfer.pretrained_lr_ratio", low=0)
    _validate_model(cfg)
    validate_optimizer(dict(cfg.optimizer))
    validate_scheduler(dict(cfg.scheduler), max_epochs=cfg.trainer.max_epochs)


def _validate_regularizer(cfg: DictConfig) -> None:
    from pipeline.data.augment import AugmentConfig
    from pipeline.training.regularizers import TTA

    check_number(cfg, "regularizer.dropout", low=0, high=1, high_open=True, optional=True)
    check_number(cfg, "regularizer.conv_dropout", low=0, high=1, high_open=True, optional=True)
    if _get(cfg, "regularizer.batch_norm") is not None:
        check_bool(cfg, "regularizer.batch_norm")
    for key in ("l1", "l2", "elastic.alpha", "weight_decay"):
        check_number(cfg, f"regularizer.{key}", low=0)
    check_number(cfg, "regularizer.elastic.l1_ratio", low=0, high=1)
    check_number(cfg, "regularizer.label_smoothing", low=0, high=1, high_open=True)
    check_bool(cfg, "regularizer.early_stopping.enabled")
    check_number(cfg, "regularizer.early_stopping.patience", integer=True, low=0)
    check_number(cfg, "regularizer.early_stopping.min_delta", low=0)
    check_choice(cfg, "regularizer.tta", list(TTA))
    augment = to_container(cfg.regularizer.augment)
    for key in augment:
        if key != "resized_crop_scale":
            check_number(cfg, f"regularizer.augment.{key}", integer=key in ("crop_padding", "cutout"), low=0)
    AugmentConfig.from_dict(augment)


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
    kwargs = {k: v for k, v in to_container(cfg.model).items() if k != "name"}
    # Regularizer choices override the model's own values when set (null keeps them).
    for key in ("dropout", "conv_dropout", "batch_norm"):
        if cfg.regularizer.get(key) is not None:
            kwargs[key] = cfg.regularizer[key]
    return dict(name=cfg.model.name, in_channels=int(cfg.data.channels), num_classes=int(num_classes),
                image_size=int(cfg.data.resize or cfg.data.image_size), **kwargs)


def prepare(cfg: DictConfig) -> DictConfig:
    """Validate and make paths absolute: the first call of every stage and task."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err)) from err
    validate(cfg)
    return resolve_paths(cfg)
