"""Reading checkpoint files without running code from them.

`torch.load(weights_only=False)` unpickles anything, and unpickling can call any function, so
a checkpoint someone else wrote (a download, a file on shared storage) could run code on load.
Every load here is weights-only: tensors, containers, numbers and strings, torch's own
allowlist. Our checkpoints need nothing more (the LightningModule's hyperparameters are
plain dicts, and Lightning stores callback states as plain values); a test keeps it so.
`weights_only=True` is passed explicitly, so `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` cannot turn
it off. MLflow models are the same risk: MLflow unpickles a pickle-format model unless
MLFLOW_ALLOW_PICKLE_DESERIALIZATION is false, so `load_mlflow_model` makes that the default
(ours are logged as torch.export programs, which load without unpickling code).
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
    """The PyTorch model at MLflow `uri`, on the CPU; a pickle-format model is refused unless
    the environment sets MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true (a server one trusts)."""
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    # The environment variable scopes the switch to this call (MLflow reads it at load time).
    chosen = os.environ.get(PICKLE_SWITCH)
    os.environ[PICKLE_SWITCH] = chosen if chosen is not None else "false"
    try:
        return mlflow.pytorch.load_model(uri, map_location="cpu")
    except MlflowException as err:
        if "pickle" not in str(err).lower():
            raise
        raise DataError(f"Refused to load {uri}: it is saved with pickle, which loading would run as code. "
                        "Log it as a torch.export program (mlflow.pytorch.log_model(..., "
                        "serialization_format='pt2'), as this pipeline does), or, for a model from a "
                        f"source you trust, set {PICKLE_SWITCH}=true.") from err
    finally:
        if chosen is None:
            os.environ.pop(PICKLE_SWITCH, None)
