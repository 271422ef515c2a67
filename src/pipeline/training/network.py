"""The inference graph without Lightning: `Preprocess` + the registry model, and reading it back
from a training checkpoint.

Evaluation, reports and exports only run the network. Lightning takes seconds to import (it
imports torchmetrics, torchvision and `torch._dynamo`), so what does not train reads the
checkpoint here, with plain torch: the same hyperparameters and weights
`Classifier.load_from_checkpoint` would give, without the LightningModule around them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import DataError
from pipeline.models import create_model
from pipeline.models.checkpoints import refusals_explained
from pipeline.models.init import init_weights

NET_PREFIX = "net."  # the network's parameters inside the LightningModule's state dict


class Preprocess(nn.Module):
    """Standardise and optionally resize, inside the model, so an exported model takes raw
    [0, 1] images of the dataset's own size and needs no separate transform code."""

    def __init__(self, mean: list[float], std: list[float], resize: int | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.resize = resize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


def build_network(arch: str, arch_kwargs: dict[str, Any], *, mean: list[float], std: list[float],
                  resize: int | None = None, init: dict[str, Any] | None = None) -> nn.Sequential:
    """`Preprocess` followed by the registry model: the whole inference graph."""
    model = init_weights(create_model(arch, **arch_kwargs), **(init or {}))
    return nn.Sequential(Preprocess(mean, std, resize), model)


@dataclass
class TrainedNetwork:
    """A checkpoint's network (on the CPU) and the hyperparameters it was trained with."""

    net: nn.Sequential
    hparams: dict[str, Any]


def load_network(path: Path | str) -> TrainedNetwork:
    """The network saved in training checkpoint `path`, read weights-only (see
    `pipeline.models.checkpoints`): a checkpoint replaced by someone else cannot run code."""
    with refusals_explained(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except (EOFError, RuntimeError) as err:
            # torch's zip reader on a cut-short or overwritten file; other RuntimeErrors are bugs.
            if isinstance(err, RuntimeError) and "PytorchStreamReader" not in str(err):
                raise
            raise DataError(f"{path} is not a readable checkpoint ({' '.join(str(err).split())[:200]}): it is "
                            "truncated or corrupt. Train again to rewrite it (`dvc repro train`, or "
                            "`dvc checkout` to restore the recorded one).") from err
    hparams = saved.get("hyper_parameters") if isinstance(saved, dict) else None
    if not isinstance(hparams, dict) or "arch" not in hparams or "state_dict" not in saved:
        raise DataError(f"{path} is not a training checkpoint of this pipeline (no architecture or weights in it): "
                        "give a run's models/best.ckpt or last.ckpt.")
    # Built as the LightningModule builds it (the init draws from the same random stream), then overwritten.
    net = build_network(hparams["arch"], dict(hparams["arch_kwargs"]), mean=hparams["mean"], std=hparams["std"],
                        resize=hparams.get("resize"), init=hparams.get("init"))
    state = {k[len(NET_PREFIX):]: v for k, v in saved["state_dict"].items() if k.startswith(NET_PREFIX)}
    net.load_state_dict(state, strict=True)
    return TrainedNetwork(net, dict(hparams))
