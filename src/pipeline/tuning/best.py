"""The train task's side of a sweep: start from `results/tune/best.yaml` (no Ray needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.config import resolve_paths
from pipeline.errors import ConfigError
from pipeline.tuning.space import GROUPS, get_dotted

BEST_FILE = Path("results") / "tune" / "best.yaml"


def best_file(cfg: DictConfig) -> Path:
    """`<paths.out_dir>/results/tune/best.yaml`: the DVC pipeline's at the project root; an ad-hoc
    `pipeline train` (its own Hydra output folder) never picks up the pipeline's."""
    return Path(resolve_paths(cfg).paths.out_dir) / BEST_FILE


def apply_best(cfg: DictConfig) -> tuple[DictConfig, dict[str, str]]:
    """A copy of `cfg` with the best trial's overrides when `tune.use_best` and the file exists,
    and the MLflow tags naming where they came from (`tuned_from`: the sweep's parent run)."""
    tune = cfg.get("tune")
    if tune is None or not tune.get("use_best", False):
        return cfg, {}
    path = best_file(cfg)
    if not path.exists():
        return cfg, {}
    best: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    overrides, config = best.get("overrides"), best.get("config")
    if not isinstance(overrides, dict) or not isinstance(config, dict):
        raise ConfigError(f"{path} has no `overrides`/`config` mappings: re-run the tune stage, "
                          "or set tune.use_best=false.")
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in overrides.items():
            if key in GROUPS:  # a group option: its whole block as the trial had it
                cfg[key] = get_dotted(config, key)
            else:
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    shown = ", ".join(f"{k}={v}" for k, v in overrides.items())
    print(f"Using the tuned hyperparameters of trial {best.get('trial_id')} "
          f"({best.get('metric')}={best.get('value')}) from {path}: {shown} (tune.use_best=false ignores them)")
    tags = {"tuned_trial": str(best.get("trial_id"))}
    trial_epochs = config.get("trainer", {}).get("max_epochs") if isinstance(config.get("trainer"), dict) else None
    if trial_epochs is not None:  # the budget the sweep tuned at (the train task checks it against its own)
        tags["tuned_max_epochs"] = str(trial_epochs)
    if best.get("mlflow_parent_run_id"):
        tags["tuned_from"] = str(best["mlflow_parent_run_id"])
    return cfg, tags
