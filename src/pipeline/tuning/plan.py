"""Checking a sweep before Ray starts: the `tune` block, the space, and every trial config
the space can produce (by its bounds), so a typo or an out-of-range bound fails in seconds."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config import check_bool, check_choice, check_number, fold_count, to_container
from pipeline.errors import ConfigError
from pipeline.training.metrics import LEARNING_CURVES
from pipeline.tuning.pareto import Objective, check_multi_objective, parse_objectives
from pipeline.tuning.selection import TIE_BREAKS
from pipeline.tuning.space import (
    GROUPS,
    Dist,
    apply_overrides,
    compose_blocks,
    flat_mapping,
    get_dotted,
    parse_space,
)
from pipeline.validation import prepare

# optuna: Optuna's TPE (multi-objective with tune.objectives); nsga2: Optuna's NSGA-II.
SEARCH_ALGS = ("random", "grid", "optuna", "nsga2")
TRIAL_SCHEDULERS = ("fifo", "asha", "hyperband", "pbt")  # Ray Tune's, not the lr schedules


@dataclass(frozen=True)
class Plan:
    tune: dict[str, Any]          # the resolved tune block
    space: dict[str, Dist]
    fixed: dict[str, Any]         # overrides every trial shares (group options by name)
    blocks: dict[str, dict]       # {group: {option: composed block}}
    base: dict[str, Any]          # resolved config with `fixed` applied and the trial settings
    cfg: DictConfig               # the prepared config (absolute paths)
    root: Path
    results: Path                 # <out_dir>/results/tune
    storage: str                  # Ray's storage_path (a folder or a URI)

    @property
    def resume_overrides(self) -> str:
        """What continues this sweep: `tune.resume=true`, and for an ad-hoc sweep (its Ray
        experiment in its own outputs/ folder) that folder again as Hydra's run folder."""
        out_dir = Path(self.cfg.paths.out_dir).resolve()
        if out_dir == self.root.resolve() or self.tune.get("storage_path"):
            return "tune.resume=true"
        return f"tune.resume=true hydra.run.dir={out_dir}"

    @property
    def steps(self) -> int:
        """What a trial reports at most: epochs, or folds with `tune.cv` (schedulers' max_t)."""
        return fold_count(self.cfg) if self.tune.get("cv") else int(self.tune["max_epochs"])

    @property
    def step_key(self) -> str:
        """The key numbering a trial's reports: `epoch`, or `fold` with `tune.cv`."""
        return "fold" if self.tune.get("cv") else "epoch"

    @property
    def objectives(self) -> list[Objective]:
        """[(metric, mode), ...] of a multi-objective sweep (`tune.objectives`); [] for one."""
        return parse_objectives(self.tune.get("objectives"))

    @property
    def storage_is_local(self) -> bool:
        return "://" not in self.storage or self.storage.startswith("file://")


def _check_tune_block(cfg: DictConfig) -> None:
    check_number(cfg, "tune.num_samples", integer=True, low=1)
    check_choice(cfg, "tune.search_alg", SEARCH_ALGS)
    check_choice(cfg, "tune.scheduler", TRIAL_SCHEDULERS)
    check_choice(cfg, "tune.metric", LEARNING_CURVES)
    check_choice(cfg, "tune.mode", ("max", "min"))
    check_number(cfg, "tune.max_epochs", integer=True, low=1)
    check_number(cfg, "tune.max_concurrent_trials", integer=True, low=1, optional=True)
    check_number(cfg, "tune.resources.cpu", low=0, low_open=True)
    check_number(cfg, "tune.resources.gpu", low=0)
    check_number(cfg, "tune.workers", integer=True, low=1)
    check_number(cfg, "tune.num_cpus", integer=True, low=1, optional=True)
    check_number(cfg, "tune.time_budget_s", low=0, low_open=True, optional=True)
    check_number(cfg, "tune.max_failures", integer=True, low=-1)
    for key in ("resume", "use_best", "cv", "system_metrics"):
        check_bool(cfg, f"tune.{key}")
    check_number(cfg, "tune.selection.alpha", low=0, high=1, low_open=True, high_open=True)
    check_choice(cfg, "tune.selection.tie_break", TIE_BREAKS)
    for key in ("address", "storage_path"):
        value = cfg.tune.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"tune.{key} must be null or a string, got {value!r}.")
    if str(cfg.tune.get("address") or "").startswith("ray://") and not cfg.tune.get("storage_path"):
        # Through Ray Client the trials and Tune's loop run on the cluster, and the results
        # are read back here: a folder on this machine is not where the cluster writes them.
        raise ConfigError(f"tune.address={cfg.tune.address} runs the sweep on the cluster, but tune.storage_path "
                          "is unset: set it to s3://bucket/path (or a folder this machine and every node mount).")
    if not isinstance(cfg.tune.get("name"), str) or not cfg.tune.name or "/" in cfg.tune.name:
        raise ConfigError(f"tune.name must be a folder name, got {cfg.tune.get('name')!r}.")
    name = cfg.tune.scheduler
    if cfg.tune.cv:
        _check_cv(cfg)
    # With tune.cv a trial reports once per fold (of every repetition): ASHA's grace period counts folds.
    steps = fold_count(cfg) if cfg.tune.cv else cfg.tune.max_epochs
    if name == "asha":
        check_number(cfg, "tune.asha.grace_period", integer=True, low=1, high=steps)
        check_number(cfg, "tune.asha.reduction_factor", low=1, low_open=True)
        check_number(cfg, "tune.asha.brackets", integer=True, low=1)
    elif name == "hyperband":
        check_number(cfg, "tune.hyperband.reduction_factor", low=1, low_open=True)
    elif name == "pbt":
        check_number(cfg, "tune.pbt.perturbation_interval", integer=True, low=1)
        check_number(cfg, "tune.pbt.quantile_fraction", low=0, high=0.5)
        check_number(cfg, "tune.pbt.resample_probability", low=0, high=1)


def _check_cv(cfg: DictConfig) -> None:
    """`tune.cv=true`: each trial trains data.split.folds x cv.repeats models in turn, in one process."""
    if cfg.tune.scheduler == "pbt":
        raise ConfigError("tune.cv=true with tune.scheduler=pbt: PBT swaps checkpoints between trials mid-training, "
                          "which has no meaning across folds; use tune.scheduler=asha, hyperband or fifo.")
    if cfg.tune.workers > 1:
        raise ConfigError("tune.cv=true trains the folds one after another inside the trial; it does not combine "
                          "with tune.workers > 1 (DDP). Set tune.workers=1, or tune.cv=false for DDP trials.")
    if cfg.data.fold is not None:
        raise ConfigError(f"tune.cv=true runs every fold itself, but data.fold={cfg.data.fold} is set: "
                          "drop the data.fold override (data.fold=null).")
    check_number(cfg, "data.split.folds", integer=True, low=2)


def _check_space_against_search(tune: dict[str, Any], space: dict[str, Dist]) -> None:
    if tune["search_alg"] == "grid":
        for key, dist in space.items():
            if not dist.categorical:
                raise ConfigError(f"tune.space.{key}={dist}: search_alg=grid tries listed values only; "
                                  "use choice[...] or grid[...] (or search_alg=random).")
    if tune["search_alg"] in ("optuna", "nsga2"):
        if tune["scheduler"] == "pbt":
            raise ConfigError("tune.scheduler=pbt changes configs during trials: use search_alg=random or grid.")
        for key, dist in space.items():
            if dist.kind == "grid":
                raise ConfigError(f"tune.space.{key}={dist}: {tune['search_alg']} cannot search grid[...]; "
                                  "use choice[...].")
    if tune["scheduler"] == "pbt":
        mutate = list(tune["pbt"].get("mutate") or [])
        mutable = pbt_keys()
        bad = [k for k in mutate if k not in mutable]
        if bad:
            raise ConfigError(f"tune.pbt.mutate: {bad} cannot change on a restored checkpoint; "
                              f"PBT can perturb {', '.join(mutable)}.")
        if not [k for k in mutate if k in space]:
            raise ConfigError(f"tune.scheduler=pbt perturbs {', '.join(mutate) or 'nothing'}: "
                              "put at least one of them in tune.space.")


def pbt_keys() -> list[str]:
    """What a restored checkpoint can take new values of: the learning rate (trial.py rescales
    the restored optimizer's rates) and the regularizers registered as PBT-mutable."""
    # Imported here, as validation.py does: importing this module stays free of torch.
    from pipeline.training.regularizers import pbt_mutable_keys

    return ["optimizer.lr", *pbt_mutable_keys()]


def _candidates(space: dict[str, Dist]) -> list[tuple[str, dict[str, Any]]]:
    """Overrides that together hit each value's bounds and each group option (with the keys
    inside that group), each labelled for the error message."""
    low = {k: d.representatives()[0] for k, d in space.items()}
    out = [("the lowest values", low)]
    for key, dist in space.items():
        for value in dist.representatives()[1:]:
            out.append((f"{key}={value}", {**low, key: value}))
        if key in GROUPS:
            inner = [k for k in space if k.startswith(key + ".")]
            for option in dist.args:
                for k in inner or [None]:
                    for value in (space[k].representatives() if k else [None]):
                        over = {**low, key: option, **({k: value} if k else {})}
                        out.append((f"{key}={option}" + (f", {k}={value}" if k else ""), over))
    return out


def plan_sweep(cfg: DictConfig) -> Plan:
    """Validate everything a sweep needs; returns the plan (nothing is started)."""
    if "tune" not in cfg:
        raise ConfigError("No `tune` block in the config: add `- tune: lr_decay_dropout` to conf/config.yaml "
                          "defaults (and regenerate params.yaml with `make params`).")
    cfg = prepare(cfg)
    _check_tune_block(cfg)
    tune = to_container(cfg.tune)
    objectives = parse_objectives(tune.get("objectives"))
    if objectives:
        check_multi_objective(tune, objectives)
    space = parse_space(cfg.tune.space)
    fixed = flat_mapping(cfg.tune.get("fixed"), "tune.fixed")
    for key in fixed:
        if key in space:
            raise ConfigError(f"tune.fixed.{key} is also in tune.space: keep it in one of them.")
    _check_space_against_search(tune, space)
    blocks = compose_blocks(space, fixed)

    base = apply_overrides(to_container(cfg), fixed, blocks)
    base["trainer"].update(max_epochs=tune["max_epochs"], enable_progress_bar=False)
    base["tracking"]["enabled"] = False      # trials never write MLflow: the driver does
    base["tune"]["use_best"] = False         # a trial trains what it sampled
    for key in space:
        if key not in GROUPS and get_dotted(base, key, _MISSING) is _MISSING and not _in_blocks(key, blocks):
            raise ConfigError(f"tune.space.{key}: no such config key (check the spelling; keys of a group "
                              "option need that option, e.g. fixed: {scheduler: exponential} for scheduler.decay).")
    for label, overrides in _candidates(space):
        candidate = apply_overrides(base, overrides, blocks)
        try:
            prepare(OmegaConf.create(copy.deepcopy(candidate)))
        except ConfigError as err:
            raise ConfigError(f"tune.space: trials with {label} would fail: {err}") from err

    root = Path(cfg.paths.root)
    # Beside the sweep's other outputs: the DVC stage's under the project's results/, an ad-hoc
    # sweep's in its own outputs/<date>/<time>/ folder.
    storage = tune.get("storage_path") or str(Path(cfg.paths.out_dir) / "results" / "ray")
    if "://" not in storage and not Path(storage).expanduser().is_absolute():
        storage = str((root / storage).resolve())
    results = Path(cfg.paths.out_dir) / "results" / "tune"
    return Plan(tune=tune, space=space, fixed=fixed, blocks=blocks, base=base, cfg=cfg, root=root,
                results=results, storage=storage)


_MISSING = object()


def _in_blocks(key: str, blocks: dict[str, dict]) -> bool:
    group, _, rest = key.partition(".")
    return any(get_dotted(block, rest, _MISSING) is not _MISSING for block in blocks.get(group, {}).values())
