"""The regularizer registry: one class per kind of regularization, each owning one key of the
`regularizer:` config block (`regularizer.l2`, `regularizer.augment`, ...).

An entry, registered with `@register_regularizer(key, default=..., pbt_mutable=...)`, declares
- its key and the default a config that leaves the key out gets (a dict default is a nested
  block, filled key by key), so a new entry's keys need not be in conf/config.yaml;
- `check(cfg, key)`: validation of its value, raising ConfigError that names the key;
- `pbt_mutable`: whether PBT may give the key a new value on a restored checkpoint (only
  when the value changes no parameter's shape and no state the checkpoint holds);
- where it acts: the hooks of `Regularizer` it overrides (see HOOKS).

`Regularizers` is one run's set, built from the block; the LightningModule, the train task
(callbacks), evaluation and `model_args` call its hooks and never name an entry.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.config import to_container
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback

# Hook method -> where the regularizer acts (for listings and error messages).
HOOKS = {
    "model_kwargs": "model option (a keyword of the model builder)",
    "criterion_kwargs": "loss (a keyword of the cross-entropy)",
    "loss_terms": "loss term (added to the loss, logged as train/loss_<name>)",
    "before_optimizer_step": "optimizer step",
    "transform_batch": "training batches",
    "callbacks": "Lightning callback",
    "probabilities": "evaluation (class probabilities)",
}


class Regularizer:
    """Base of every entry: `value` is its key's value in the block, `seed` the run's seed.

    A subclass overrides `check`, `active` and the hooks where it acts; the others stay no-ops.
    """

    key: ClassVar[str]
    default: ClassVar[Any]
    pbt_mutable: ClassVar[bool] = False

    def __init__(self, value: Any, *, seed: int = 0) -> None:
        self.value = value
        self.seed = seed

    @classmethod
    def check(cls, cfg: DictConfig, key: str) -> None:
        """Raise ConfigError naming `key` (`regularizer.<name>`) if its value in `cfg` is bad."""

    @property
    def active(self) -> bool:
        """False when the value switches this regularizer off: its hooks are then skipped."""
        return bool(self.value)

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def generators(self) -> list[torch.Generator]:
        """Its own random generators, whose state a checkpoint carries (a resumed run draws on)."""
        return []

    def criterion_kwargs(self) -> dict[str, Any]:
        return {}

    def loss_terms(self, net: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def before_optimizer_step(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def transform_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def callbacks(self, *, monitor: str, mode: str) -> list[Callback]:
        return []

    def probabilities(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(net(x), 1)


_REGISTRY: dict[str, type[Regularizer]] = {}
R = TypeVar("R", bound=type[Regularizer])


def register_regularizer(key: str, *, default: Any, pbt_mutable: bool = False) -> Callable[[R], R]:
    """Class decorator registering an entry for `regularizer.<key>`; a duplicate key raises
    ValueError, an entry without its own `check` TypeError."""

    def decorator(cls: R) -> R:
        if key in _REGISTRY:
            # A silent overwrite would make what a config means depend on import order.
            raise ValueError(f"Regularizer {key!r} is already registered by {_REGISTRY[key]!r}.")
        if cls.check.__func__ is Regularizer.check.__func__:
            # Every value is checked before anything runs; an entry without a check would let
            # a typo'd value through to training.
            raise TypeError(f"Regularizer {key!r} ({cls.__name__}) must define its own `check`.")
        cls.key, cls.default, cls.pbt_mutable = key, default, pbt_mutable
        _REGISTRY[key] = cls
        return cls

    return decorator


def list_regularizers() -> dict[str, list[str]]:
    """Each registered key (in registration order) with the hooks where it acts."""
    return {key: acts(cls) for key, cls in _REGISTRY.items()}


def acts(cls: type[Regularizer]) -> list[str]:
    """The hooks of HOOKS that `cls` overrides."""
    return [hook for hook in HOOKS if getattr(cls, hook) is not getattr(Regularizer, hook)]


def regularizer_defaults() -> dict[str, Any]:
    """The block a config gets when it sets nothing: every key at its default."""
    return {key: copy.deepcopy(cls.default) for key, cls in _REGISTRY.items()}


def pbt_mutable_keys() -> list[str]:
    """Dotted keys (`regularizer.dropout`, or each leaf of a nested block) PBT may perturb."""
    out = []
    for key, cls in _REGISTRY.items():
        if cls.pbt_mutable:
            leaves = cls.default if isinstance(cls.default, dict) else {"": None}
            out += [f"regularizer.{key}" + (f".{leaf}" if leaf else "") for leaf in leaves]
    return out


def _copy(block: Any) -> Any:
    """A plain copy (the block may be a DictConfig, a checkpoint's dict, or None)."""
    return to_container(block) if OmegaConf.is_config(block) else copy.deepcopy(block)


def _unknown(where: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}.{name} is not a key of {where}; it takes: {', '.join(known)}.{hint}")


def _fill(value: Any, default: Any, where: str) -> Any:
    if not isinstance(default, dict):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a block with keys {', '.join(default)}, got {value!r}.")
    for name in value:
        if name not in default:
            raise _unknown(where, name, list(default))
    # The config's own order first (it is what gets logged and saved), missing keys after.
    filled = {name: _fill(v, default[name], f"{where}.{name}") for name, v in value.items()}
    return {**filled, **{name: copy.deepcopy(d) for name, d in default.items() if name not in value}}


def complete(block: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    """A plain copy of the `regularizer` block with every registered key, defaults filled in;
    a key no entry owns raises ConfigError naming it."""
    given = _copy(block) or {}
    if not isinstance(given, dict):
        raise ConfigError(f"regularizer must be a block of {', '.join(_REGISTRY)}, got {given!r}.")
    for name in given:
        if name not in _REGISTRY:
            raise _unknown("regularizer", name, list(_REGISTRY))
    return _fill(given, regularizer_defaults(), "regularizer")


def check_regularizers(block: Mapping[str, Any] | DictConfig | None) -> None:
    """Validate a `regularizer` block: each entry checks its own key, then the set is built."""
    view = OmegaConf.create({"regularizer": complete(block)})
    for key in view.regularizer:  # in the config's order, so the first bad key is reported first
        _REGISTRY[key].check(view, f"regularizer.{key}")
    Regularizers(view.regularizer)


class Regularizers:
    """One run's regularizers, built from its `regularizer` block; each hook runs the active
    entries that act there, in registration order."""

    def __init__(self, block: Mapping[str, Any] | DictConfig | None, *, seed: int = 0) -> None:
        values = complete(block)
        entries = [cls(values[key], seed=seed) for key, cls in _REGISTRY.items()]
        self._active = [e for e in entries if e.active]
        self._at = {hook: [e for e in entries if e.active and hook in acts(type(e))] for hook in HOOKS}
        evaluating = [e.key for e in self._at["probabilities"]]
        if len(evaluating) > 1:
            # Two test-time views of one prediction have no single meaning: pick one.
            raise ConfigError(f"regularizer: {' and '.join(evaluating)} both change evaluation; keep one.")

    def acts(self, hook: str) -> bool:
        """Whether any active regularizer acts at `hook` (lets hot paths skip the call)."""
        return bool(self._at[hook])

    def model_kwargs(self) -> dict[str, Any]:
        """Keywords for the model builder, overriding the model config's own."""
        return {k: v for e in self._at["model_kwargs"] for k, v in e.model_kwargs().items()}

    def generators(self) -> list[torch.Generator]:
        """The active entries' random generators, in registration order."""
        return [g for e in self._active for g in e.generators()]

    def criterion_kwargs(self) -> dict[str, Any]:
        """Keywords for every cross-entropy of the training loss (main and auxiliary heads)."""
        return {k: v for e in self._at["criterion_kwargs"] for k, v in e.criterion_kwargs().items()}

    def loss_terms(self, net: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Terms to add to the training loss, by name."""
        return {k: v for e in self._at["loss_terms"] for k, v in e.loss_terms(net, logits, y).items()}

    def before_optimizer_step(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for e in self._at["before_optimizer_step"]:
            e.before_optimizer_step(net, optimizer)

    def transform_batch(self, x: torch.Tensor) -> torch.Tensor:
        """A training batch's images, transformed (labels are left alone)."""
        for e in self._at["transform_batch"]:
            x = e.transform_batch(x)
        return x

    def callbacks(self, *, monitor: str, mode: str = "max") -> list[Callback]:
        """Lightning callbacks, given the metric the run optimises and its direction."""
        return [cb for e in self._at["callbacks"] for cb in e.callbacks(monitor=monitor, mode=mode)]

    def probabilities(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities of an evaluation batch: the softmax, or the active entry's views."""
        for e in self._at["probabilities"]:
            return e.probabilities(net, x)
        return F.softmax(net(x), 1)
