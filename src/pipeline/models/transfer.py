"""Transfer learning: start from pretrained weights, freeze layers, fine-tune gently.

Sources (`transfer.source`):
- a checkpoint file: a Lightning `.ckpt` of this pipeline, or a `.pt`/`.pth` state dict.
  Files load weights-only (`models.checkpoints`): a pickled module is refused, since
  unpickling one could run any code (save its `state_dict()` instead);
- an MLflow model URI: `runs:/<run_id>/model`, `models:/<name>/<version>`, `models:/<id>`,
  `models:/<name>@champion` (the registry's best: `tracking.register`), read from the store
  `tracking.tracking_uri` names (a pickle-format model loads weights-only there too:
  network classes only);
- torchvision weights by name: `torchvision:ResNet18_Weights.IMAGENET1K_V1` (downloaded
  once into torch's cache on a networked machine).
Weights are matched by parameter name and shape; if the names differ (torchvision's
layout against ours) but the architecture is the same, by order and shape. Tensors whose
shape does not match (a classifier for another class count) are skipped, so the new head
keeps its fresh initialisation.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ConfigError, PipelineError
from pipeline.models.checkpoints import load_file, load_mlflow_model

# Our LightningModule stores the network as `net = Sequential(Preprocess, model)`; a logged
# model is that Sequential. (Preprocess's prefix, the model's prefix) in each.
_WRAPPERS = (("net.0.", "net.1."), ("0.", "1."))


def load_state(source: str) -> dict[str, torch.Tensor]:
    """The state dict behind `source` (see the module docstring for the forms)."""
    if source.startswith("torchvision:"):
        return _torchvision_state(source.removeprefix("torchvision:"))
    if source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        return _strip(load_mlflow_model(source).state_dict())
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"transfer.source={source!r}: no such file. Give a checkpoint path, an MLflow URI "
                          "(runs:/<id>/model) or torchvision:<WeightsName>.")
    obj = load_file(path)  # weights-only: a file from elsewhere cannot run code
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"transfer.source={source!r} holds a {type(obj).__name__}, not a state dict.")
    return _strip(obj)


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The registry model's tensors: our wrapper's prefix dropped where Preprocess's buffers
    show the wrapper (a plain state dict of a Sequential model also has `1.` keys)."""
    for preprocess, model in _WRAPPERS:
        if {f"{preprocess}mean", f"{preprocess}std"} <= state.keys():
            return {k[len(model):]: v for k, v in state.items() if k.startswith(model)}
    return dict(state)


def _torchvision_state(name: str) -> dict[str, torch.Tensor]:
    from torchvision.models import get_weight

    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError) as err:
        raise ConfigError(f"transfer.source=torchvision:{name} is not a torchvision weights name "
                          "(e.g. ResNet18_Weights.IMAGENET1K_V1).") from err
    try:
        return weights.get_state_dict(progress=False)
    except OSError as err:  # URLError is an OSError: no network and nothing cached
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise ConfigError(f"Could not download {name} ({err}). On an offline machine place "
                          f"{Path(weights.url).name} in {cache}.") from err


def transfer_weights(model: nn.Module, state: dict[str, torch.Tensor], *, source: str | None = None,
                     arch: str | None = None) -> list[str]:
    """Copy matching tensors of `state` into `model` (registry architecture `arch`), read from
    `source` (for the error message); returns the names loaded."""
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(matched) < len(own) // 2:
        # Names differ (another implementation of the same design): pair tensors in order.
        positional = {}
        for (name, mine), theirs in zip(own.items(), state.values()):
            if mine.shape != theirs.shape:
                continue
            positional[name] = theirs
        if len(positional) > len(matched):
            matched = positional
    if not matched:
        theirs = _checkpoint_arch(source) if source else None
        holds = f" holds a {theirs} checkpoint, which" if theirs else ""
        target = f"model {arch}" if arch else "this model"
        if theirs and theirs == arch:
            fix = "its layers have other shapes (other model arguments, e.g. widths): use the source's model settings"
        elif theirs:
            fix = f"set model={theirs} to fine-tune it"
        else:
            fix = "set model= to the source's architecture"
        raise ConfigError(f"transfer.source={source or '?'}{holds} shares no layer (by name or shape) with "
                          f"{target}: {fix}, or choose a source of {arch or 'this model'}'s architecture.")
    model.load_state_dict(matched, strict=False)
    params = dict(model.named_parameters())
    return [k for k in matched if k in params]


def _checkpoint_arch(source: str) -> str | None:
    """The registry architecture a checkpoint file of this pipeline was trained as, if it is one."""
    path = Path(source).expanduser()
    if not path.is_file():
        return None
    try:
        obj = load_file(path)
    except PipelineError:
        return None
    hparams = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    arch = hparams.get("arch") if isinstance(hparams, dict) else None
    return arch if isinstance(arch, str) else None


def freeze(model: nn.Module, prefixes: Iterable[str]) -> list[str]:
    """Stop gradients for parameters whose name starts with any prefix; returns their names."""
    # str: a numbered layer (an MLP's `1`) comes from the config as an int (transfer.freeze=[1]).
    prefixes = tuple(str(p) for p in prefixes)
    frozen = []
    for name, p in model.named_parameters():
        if prefixes and name.startswith(prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    if prefixes and not frozen:
        names = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
        raise ConfigError(f"transfer.freeze={list(prefixes)} matches no parameter; top-level layers are: "
                          f"{', '.join(names)}.")
    return frozen


def describe(model: nn.Module, source: str, loaded: Iterable[str], frozen: Iterable[str],
             prefixes: Iterable[str] = ()) -> str:
    """One line saying what a transfer did to `model`: the parameters loaded from `source`,
    the layers left at their fresh initialisation (the new head: no tensor of that name and
    shape in the source) and what the `prefixes` (transfer.freeze) froze."""
    loaded, frozen, prefixes = set(loaded), list(frozen), [str(p) for p in prefixes]
    names = [n for n, _ in model.named_parameters()]
    fresh = _layers(n for n in names if n not in loaded)
    held = f"{', '.join(prefixes)} ({len(frozen)} tensors)" if frozen else "nothing"
    return (f"transfer: loaded {len(loaded)} of {len(names)} parameter tensors from {source}; "
            f"new (fresh weights): {', '.join(fresh) or 'none'}; froze {held}")


def _layers(names: Iterable[str]) -> list[str]:
    """The layers (`classifier.6`) owning these parameters (`classifier.6.weight`), in order."""
    return list(dict.fromkeys(n.rpartition(".")[0] or n for n in names))


def param_groups(model: nn.Module, pretrained: Iterable[str], *, lr: float, ratio: float) -> list[dict]:
    """Optimizer groups: pretrained parameters at lr * ratio, new ones at lr (frozen ones left out)."""
    pretrained = set(pretrained)
    old, new = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (old if name in pretrained else new).append(p)
    groups = [{"params": new, "lr": lr}, {"params": old, "lr": lr * ratio}]
    return [g for g in groups if g["params"]]
