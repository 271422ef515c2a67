"""Reading checkpoint files without running code from them.

`torch.load(weights_only=False)` unpickles anything, and unpickling can call any function, so
a checkpoint someone else wrote (a download, a file on shared storage) could run code on load.
Every load here is weights-only: tensors, containers, numbers and strings, torch's own
allowlist. Our checkpoints need nothing more (the LightningModule's hyperparameters are
plain dicts, and Lightning stores callback states as plain values); a test keeps it so.
`weights_only=True` is passed explicitly, so `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` cannot turn
it off.

MLflow models are the same risk: MLflow unpickles a pickle-format model. Ours are logged in
that format, since it is the one `mlflow.pytorch.load_model` gives back as the eager
`nn.Module` users expect (a `torch.export` program loads as a graph that cannot switch mode
or device). `load_mlflow_model` reads one weights-only, allowing only network classes
(`nn.Module` subclasses of torch.nn and of this package), which unpickling builds without
calling any code of the file's choosing; anything else is refused unless the environment
sets MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true. A `torch.export` model (earlier runs) loads
as before.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import DataError
from pipeline.quiet import import_mlflow_pytorch

PICKLE_SWITCH = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


@contextmanager
def refusals_explained(path: Path | str) -> Iterator[None]:
    """Turn torch's weights-only refusal while loading `path` into a DataError saying why."""
    try:
        yield
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found is None:
            raise DataError(f"{path} is not a PyTorch state dict or checkpoint (torch.load cannot read it "
                            "weights-only).") from err
        raise DataError(
            f"Refused to load {path}: it holds {found.group(1)}, which loading would import and call. "
            "Checkpoint files load weights-only (tensors and plain values), so a file from elsewhere "
            "cannot run code. For a pickled model you trust, save its weights with "
            "torch.save(model.state_dict(), 'weights.pt') and use that file.") from err


def load_file(path: Path | str) -> Any:
    """The object saved in `path` (a state dict, a Lightning checkpoint), on the CPU, weights-only."""
    with refusals_explained(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError) as err:  # not a torch file: a bad zip archive, an empty file
            raise DataError(f"{path} is not a PyTorch state dict or checkpoint ({err}).") from err


def load_mlflow_model(uri: str) -> nn.Module:
    """The PyTorch model at MLflow `uri`, on the CPU. A pickle-format model loads weights-only
    (network classes only) unless the environment sets MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true
    (a source one trusts), which lets MLflow unpickle it."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    pickled = local / Model.load(local).flavors["pytorch"]["model_data"] / "model.pth"
    chosen = os.environ.get(PICKLE_SWITCH)
    if pickled.is_file() and (chosen or "").lower() not in ("true", "1"):
        return load_network_file(pickled, uri)
    # The environment variable scopes the switch to this call (MLflow reads it at load time).
    os.environ[PICKLE_SWITCH] = chosen if chosen is not None else "false"
    try:
        return import_mlflow_pytorch().load_model(str(local), map_location="cpu")
    except MlflowException as err:
        if "pickle" not in str(err).lower():
            raise
        raise DataError(f"Refused to load {uri}: it is saved with pickle, which loading would run as code. "
                        f"For a model from a source you trust, set {PICKLE_SWITCH}=true.") from err
    finally:
        if chosen is None:
            os.environ.pop(PICKLE_SWITCH, None)


NETWORK_PACKAGES = ("torch.nn.", "pipeline.")


def load_network_file(path: Path, source: str) -> nn.Module:
    """An `nn.Module` saved whole with `torch.save` (MLflow's pickle format), read weights-only:
    the only classes it may name are `nn.Module` subclasses from `NETWORK_PACKAGES`, which
    unpickling creates and fills with tensors and plain values without calling code of the
    file's choosing. Anything else is a DataError naming it."""
    with refusals_explained(path):
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    classes = [_network_class(name, source) for name in names]
    with torch.serialization.safe_globals(classes), refusals_explained(path):
        model = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(model, nn.Module):
        raise DataError(f"{source} holds a {type(model).__name__}, not a PyTorch network.")
    return model


def _network_class(name: str, source: str) -> type:
    module_name, _, attr = name.rpartition(".")
    found = None
    if name.startswith(NETWORK_PACKAGES):
        import importlib

        try:
            found = getattr(importlib.import_module(module_name), attr, None)
        except ImportError:
            found = None
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise DataError(f"Refused to load {source}: it names {name}, which is not a network class of torch.nn or "
                        f"this pipeline, and loading it could run code. For a model from a source you trust, set "
                        f"{PICKLE_SWITCH}=true.")
    return found
