"""Search spaces: `tune.space` strings -> Ray Tune domains, and trial configs from samples.

A space maps a dotted config key to a distribution string::

    optimizer.lr: loguniform(1e-4, 1e-1)
    model: choice[lenet5, minivgg, resnet20]     # a config group: whole group options

Group options are composed with Hydra here, in the driver, into plain blocks; a trial only
swaps blocks and sets values in a plain dict (`trial_config`), so trials never need Hydra.
This module imports neither Ray nor torch: the train task uses it to apply `best.yaml`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config import compose, flatten
from pipeline.errors import ConfigError

# Config groups whose options a space (or `tune.fixed`) can choose between.
GROUPS = ("model", "optimizer", "scheduler", "regularizer")
FORMS = ("loguniform(low, high), uniform(low, high), quniform(low, high, q), randint(low, high) "
         "(high excluded), choice[a, b, ...], grid[a, b, ...]")
_CALL = re.compile(r"^\s*(loguniform|uniform|quniform|randint)\s*\((.*)\)\s*$")
_LIST = re.compile(r"^\s*(choice|grid)\s*\[(.*)\]\s*$")


@dataclass(frozen=True)
class Dist:
    """One parsed distribution: kind is loguniform, uniform, quniform, randint, choice or grid."""

    kind: str
    args: tuple

    @property
    def categorical(self) -> bool:
        return self.kind in ("choice", "grid")

    def representatives(self) -> list[Any]:
        """Values that bound what the distribution can sample (to validate before any trial)."""
        if self.categorical:
            return list(self.args)
        low, high = self.args[0], self.args[1]
        if self.kind == "randint":
            return [low, high - 1]
        return [low, low + 0.999 * (high - low)]

    def domain(self) -> Any:
        """The Ray Tune search-space object (grid[...] is Tune's grid_search)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def __str__(self) -> str:
        if self.categorical:
            return f"{self.kind}[{', '.join(map(str, self.args))}]"
        return f"{self.kind}({', '.join(map(str, self.args))})"


def _scalar(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse(key: str, text: Any) -> Dist:
    """Parse one distribution string; the error names `tune.space.<key>` and the accepted forms."""
    where = f"tune.space.{key}"
    if not isinstance(text, str):
        raise ConfigError(f"{where}={text!r} is not a distribution: use one of {FORMS}.")
    if match := _LIST.match(text):
        kind, body = match.groups()
        values = [_scalar(v) for v in body.split(",")] if body.strip() else []
        if not values or any(v == "" for v in values):
            raise ConfigError(f"{where}={text!r}: {kind}[...] needs a comma-separated list of values.")
        return Dist(kind, tuple(values))
    if match := _CALL.match(text):
        kind, body = match.groups()
        args = [_scalar(v) for v in body.split(",")]
        arity = 3 if kind == "quniform" else 2
        numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if len(args) != arity or not numbers:
            raise ConfigError(f"{where}={text!r}: {kind} takes {arity} numbers; accepted forms: {FORMS}.")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}={text!r}: randint takes integers.")
        low, high = args[0], args[1]
        if not low < high:
            raise ConfigError(f"{where}={text!r}: low must be below high.")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}={text!r}: loguniform needs 0 < low.")
        if kind == "quniform" and args[2] <= 0:
            raise ConfigError(f"{where}={text!r}: quniform needs a step q > 0.")
        return Dist(kind, tuple(float(a) if kind != "randint" else a for a in args))
    raise ConfigError(f"{where}={text!r} is not a distribution: use one of {FORMS}.")


def flat_mapping(node: Any, where: str) -> dict[str, Any]:
    """`{optimizer.lr: x}` or `{optimizer: {lr: x}}` (as `++tune.space.optimizer.lr=...` makes)
    -> `{"optimizer.lr": x}`; later entries win."""
    if node is None:
        return {}
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of dotted config keys, got {data!r}.")
    return flatten(data)


def parse_space(space: Any) -> dict[str, Dist]:
    """The whole `tune.space`, group keys checked to hold only choice[...]/grid[...]."""
    parsed = {key: parse(key, text) for key, text in flat_mapping(space, "tune.space").items()}
    if not parsed:
        raise ConfigError("tune.space is empty: choose a space (tune=lr_decay_dropout) or add keys.")
    for key, dist in parsed.items():
        if key in GROUPS and not dist.categorical:
            raise ConfigError(f"tune.space.{key}: {key} is a config group; choose options with "
                              f"choice[...] or grid[...], e.g. choice[{key}_a, {key}_b].")
        if key.split(".")[0] not in GROUPS + ("data", "trainer", "init", "transfer", "seed"):
            raise ConfigError(f"tune.space.{key}: only model, optimizer, scheduler, regularizer, init, "
                              "transfer, trainer, data and seed keys can be searched.")
        if key in GROUPS and not all(isinstance(v, str) for v in dist.args):
            raise ConfigError(f"tune.space.{key}={dist}: group options are names, e.g. choice[lenet5, mlp].")
    return parsed


def compose_block(group: str, option: str, where: str = "tune") -> dict[str, Any]:
    """Group `group`'s option `option`, composed from conf/ like `group=option` on the command
    line, as a plain block (interpolations kept: they resolve in the trial's own config)."""
    try:
        composed = compose([f"{group}={option}"])
    except ConfigError as err:
        raise ConfigError(f"{where}: {group}={option} does not compose: {err}") from err
    return OmegaConf.to_container(composed[group], resolve=False)  # type: ignore[return-value]


def compose_blocks(space: dict[str, Dist], fixed: dict[str, Any]) -> dict[str, dict[str, dict]]:
    """`{group: {option: block}}` for every group option the space or `fixed` names."""
    blocks: dict[str, dict[str, dict]] = {}
    for key, dist in space.items():
        if key in GROUPS:
            blocks.setdefault(key, {}).update({str(o): compose_block(key, str(o), f"tune.space.{key}")
                                               for o in dist.args})
    for key, option in fixed.items():
        if key in GROUPS:
            blocks.setdefault(key, {})[str(option)] = compose_block(key, str(option), f"tune.fixed.{key}")
    return blocks


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        child = d.get(part)
        if not isinstance(child, dict):
            child = d[part] = {}
        d = child
    d[last] = value


def get_dotted(d: Mapping[str, Any], key: str, default: Any = None) -> Any:
    for part in key.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return default
        d = d[part]
    return d


def apply_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any],
                    blocks: Mapping[str, Mapping[str, dict]]) -> dict[str, Any]:
    """A copy of `base` with group keys swapped for their composed blocks first, then the
    dotted keys set (so `scheduler: exponential` + `scheduler.decay: 0.1` compose)."""
    cfg = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if key in GROUPS:
            cfg[key] = copy.deepcopy(blocks[key][str(value)])
    for key, value in overrides.items():
        if key not in GROUPS:
            set_dotted(cfg, key, value)
    return cfg


trial_config = apply_overrides  # a trial's config: the base with its sampled overrides
