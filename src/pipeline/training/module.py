"""The LightningModule: a registry network behind a preprocessing layer, trained with
cross-entropy. Its hyperparameters (architecture name and arguments, input statistics,
optimizer and schedule) are saved in every checkpoint, so `Classifier.load_from_checkpoint`
rebuilds it without the config.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import create_model
from pipeline.training.optim import build_optimizer, build_scheduler


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
                  resize: int | None = None) -> nn.Sequential:
    """`Preprocess` followed by the registry model: the whole inference graph."""
    return nn.Sequential(Preprocess(mean, std, resize), create_model(arch, **arch_kwargs))


class Classifier(L.LightningModule):
    """Cross-entropy classifier; logs train/val loss and accuracy and the learning rate per epoch."""

    def __init__(self, *, arch: str, arch_kwargs: dict[str, Any], mean: list[float], std: list[float],
                 resize: int | None, optimizer: dict[str, Any], scheduler: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_network(arch, arch_kwargs, mean=mean, std=std, resize=resize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        # Epoch-level, batch-size-weighted means: the curves DVC, MLflow and Tune all read.
        n = len(y)
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, batch_size=n, prog_bar=split == "val")
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, batch_size=n, prog_bar=split == "val")
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)
        # The rate used during this epoch (schedulers step after it ends).
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)

    def configure_optimizers(self) -> dict[str, Any]:
        opt_cfg = dict(self.hparams.optimizer)
        optimizer = build_optimizer(self.parameters(), opt_cfg.pop("name"), **opt_cfg)
        sched_cfg = dict(self.hparams.scheduler)
        scheduler = build_scheduler(optimizer, sched_cfg.pop("name"), **sched_cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
