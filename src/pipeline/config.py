"""Configuration primitives: finding, composing and loading the config, absolute paths,
and the checks that name a bad key. Validating a whole config (each group by the module that
builds it) is `pipeline.validation.prepare`, one layer up.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError

CONFIG_NAME = "config"
PACKAGED_CONF = "pipeline.conf"  # conf/ inside the installed package
PARAMS_FILE = "params.yaml"


def find_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) holding dvc.yaml, else `start`."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    return start


def config_dir(root: Path | None = None) -> Path:
    """The `conf/` folder to compose: a project's own (at or above `root`, default cwd, beside
    its dvc.yaml), else the checkout's beside this source (`src/` layout), else the copy
    installed with the package (`pipeline.conf`), so an installed `pipeline` works anywhere."""
    for candidate in (find_root(root) / "conf", _checkout_conf(), _installed_conf()):
        if candidate is not None and (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return candidate
    raise ConfigError("No conf/ folder found: run from the project folder (the one with dvc.yaml), "
                      "or install the package (pip install .), which ships its conf/.")


def _checkout_conf() -> Path | None:
    """`<repo>/conf` when this module runs from `<repo>/src/pipeline/` (a checkout, editable or
    on PYTHONPATH): the checkout's own conf, even where another install's `pipeline.conf` is
    importable."""
    src = Path(__file__).resolve().parents[1]
    return src.parent / "conf" if src.name == "src" else None


def _installed_conf() -> Path | None:
    """The `pipeline.conf` package a wheel installs (pyproject maps the top-level conf/ to
    it): a folder of YAML files, which Hydra reads as it reads conf/."""
    from importlib.util import find_spec

    spec = find_spec(PACKAGED_CONF)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def compose(overrides: Sequence[str] = (), *, conf: Path | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides, as DVC and the CLI do."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    # Inside a @hydra.main app (e.g. `pipeline tune` composing group options) Hydra
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
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML ({_first_line(err)}); {path.name} {PARAMS_FIX}.") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} holds a {type(cfg).__name__}, not the config mapping; {path.name} {PARAMS_FIX}.")
    return cfg


# params.yaml is written, never edited by hand: the fix of a bad value is where it comes from.
PARAMS_FIX = ("is written from conf/: fix the value there and rewrite it with `pipeline params`, "
              "or set it with `dvc exp run -S key=value`")


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


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


def plain(value: Any) -> Any:
    """Mappings → dicts, other sequences (not strings) → lists, numpy scalars → numbers.

    OmegaConf nodes are resolved in place first, so an interpolation still sees the config
    it came from, and a missing ``???`` stays the string for the caller's check to name.
    """
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy and torch scalars (and arrays, as nested lists)
        return value.tolist()
    return value


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists stay values; a later duplicate key wins)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out.pop(key, None)  # `{a.b: 1, a: {b: 2}}`: the later entry wins, in its place
            out[key] = v
    return out


# ---------------------------------------------------------------------------- validation

def get_required(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{key} is required but not set: add `{key}=...` to the command or config.") from err


def check_number(cfg: DictConfig, key: str, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False,
                 optional: bool = False) -> Any:
    """Check `key` is a number (an int if `integer`) within the interval; the message names the key."""
    value = get_required(cfg, key)
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
    value = get_required(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    return value


def check_auto_bool(setting: object, key: str, meaning: str) -> None:
    """ConfigError unless `setting` (the value of `key`) is auto, true or false; `meaning`
    says what auto does and that true or false forces it."""
    if not (setting == "auto" or isinstance(setting, bool)):
        raise ConfigError(f"{key}={setting!r} is not one of auto, true, false: {meaning}")


def check_choice(cfg: DictConfig, key: str, choices: Sequence[str]) -> str:
    value = get_required(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(sorted(choices))}.")
    return value


def check_keys(cfg: DictConfig, block: str, known: Sequence[str]) -> None:
    """Check block `block` (`""`: the top level) has no key outside `known`: a typo, or a
    `+key=...` that nothing reads, would otherwise be ignored in silence. The message names
    the key and the closest known one."""
    node = OmegaConf.select(cfg, block) if block else cfg
    if node is None:
        return  # a missing block is for the checks of its keys to name
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"{block} must be a block of keys ({', '.join(known)}), got {node!r}.")
    for name in node:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{f'{block}.{name}' if block else name} is not a key of {block or 'the config'}; "
                              f"it takes: {', '.join(known)}.{hint}")


def fold_count(cfg: DictConfig) -> int:
    """How many models cross-validation trains: data.split.folds in each of cv.repeats
    repetitions (the cv stage, and each trial of a `tune.cv` sweep)."""
    return int(cfg.data.split.folds) * int(OmegaConf.select(cfg, "cv.repeats", default=1))


def fold_position(cfg: DictConfig, fold: int) -> tuple[int, int]:
    """(repetition, fold within it) of cross-validation fold `fold`, which counts through
    every repetition's folds (cv.repeats x data.split.folds, repetition-major)."""
    return divmod(fold, int(cfg.data.split.folds))


def fold_config(cfg: DictConfig, fold: int) -> DictConfig:
    """The config of cross-validation fold `fold`: fold i validates, the other folds (of its
    repetition) train, and its outputs go to <out>/cv/fold_<i> (with cv.repeats > 1,
    <out>/cv/rep_<r>/fold_<i>, i counted within repetition r)."""
    fold_cfg = cfg.copy()
    repeated = int(OmegaConf.select(cfg, "cv.repeats", default=1)) > 1
    rep, i = fold_position(cfg, fold)
    with open_dict(fold_cfg):
        fold_cfg.data.fold = fold
        # Fold models are evidence, not deliverables: skip the (slow) model export per fold.
        fold_cfg.tracking.log_model = False
        fold_cfg.tracking.register = False  # nor a registry version
        if cfg.tracking.run_name:
            fold_cfg.tracking.run_name = f"{cfg.tracking.run_name}-{f'rep{rep}-' if repeated else ''}fold{i}"
        fold_dir = Path(cfg.paths.out_dir) / "cv"
        fold_cfg.paths.out_dir = str((fold_dir / f"rep_{rep}" if repeated else fold_dir) / f"fold_{i}")
    return fold_cfg
