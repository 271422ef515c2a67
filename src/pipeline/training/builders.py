"""The parts of one training run: the data module, the LightningModule and the Trainer.

The train task builds them from its config, and the bench builds the very same ones without
the task. Each builder takes the config sections it reads, never the whole config; the
architecture's arguments come from `pipeline.validation.model_args`, a layer up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from pipeline.config import to_container
from pipeline.data.batches import channel_stats
from pipeline.data.datamodule import ArrayDataModule
from pipeline.training.checkpoint_io import AtomicCheckpointIO
from pipeline.training.module import Classifier


def build_datamodule(images: np.ndarray, labels: np.ndarray, data: DictConfig, *, train_idx: np.ndarray,
                     val_idx: np.ndarray, test_idx: np.ndarray | None = None, seed: int) -> ArrayDataModule:
    """Batches of the given index sets, as large as `data` says (and on the device if
    `data.device_cache` says so); `seed` shuffles the training batches."""
    return ArrayDataModule(images, labels, train_idx=train_idx, val_idx=val_idx, test_idx=test_idx,
                           batch_size=data.batch_size, eval_batch_size=data.eval_batch_size, seed=seed,
                           device_cache=data.get("device_cache", "auto"))  # absent from older runs' configs


def input_stats(dm: ArrayDataModule, data: DictConfig) -> tuple[list[float], list[float]]:
    """The per-channel (mean, std) the network standardises its input with: the training
    images' own with `data.normalize` (never the validation or test images'), else (0, 1)."""
    if data.normalize:
        return channel_stats(dm.images, dm.parts["train"])
    return [0.0] * data.channels, [1.0] * data.channels


def build_module(arch: str, arch_kwargs: dict[str, Any], *, mean: list[float], std: list[float],
                 resize: int | None, optimizer: DictConfig, scheduler: DictConfig, regularizer: DictConfig,
                 init: DictConfig, seed: int) -> Classifier:
    """The registry network `arch` behind its preprocessing, trained as the sections say;
    `seed` seeds the batch augmentation."""
    return Classifier(arch=arch, arch_kwargs=arch_kwargs, mean=mean, std=std, resize=resize,
                      optimizer=to_container(optimizer), scheduler=to_container(scheduler),
                      regularizer=to_container(regularizer), init=to_container(init),
                      augment_seed=seed)


def speed_up(module: Classifier, trainer: DictConfig, *, compile_backend: str = "inductor") -> None:
    """`trainer.channels_last` and `trainer.compile` applied to `module`'s network, in place.

    Both leave the state dict as it is (`nn.Module.compile` wraps the call, not the module), so
    checkpoints, evaluation and transfer read the same weights whether or not they were on.
    `compile_backend` is torch.compile's (tests pass "eager" to check the wiring in seconds).
    """
    if trainer.get("channels_last"):
        module.net.to(memory_format=torch.channels_last)
        module.channels_last = True
    if trainer.get("compile"):
        module.net.compile(backend=compile_backend)


def build_trainer(trainer: DictConfig, callbacks: Sequence[Callback], *, root_dir: str | Path,
                  **overrides: Any) -> L.Trainer:
    """A Trainer as the `trainer` section says, logging nowhere (`EpochRecorder` writes the
    curves and MLflow) and without sanity validation; `overrides` win (a Ray Train worker's
    DDP strategy, the bench's step budget)."""
    t = trainer
    kwargs = {k: t[k] for k in ("gradient_clip_val", "limit_train_batches", "limit_val_batches") if t[k] is not None}
    kwargs.update(max_epochs=t.max_epochs, accelerator=t.accelerator, devices=t.devices, precision=t.precision,
                  deterministic=t.deterministic, callbacks=list(callbacks), logger=False,
                  enable_progress_bar=t.enable_progress_bar, enable_model_summary=False,
                  num_sanity_val_steps=0, default_root_dir=str(root_dir))
    kwargs.update(overrides)
    if not _has_checkpoint_io(kwargs):  # checkpoints replace their previous file atomically
        kwargs["plugins"] = [*_as_list(kwargs.get("plugins")), AtomicCheckpointIO()]
    return L.Trainer(**kwargs)


def _as_list(plugins: Any) -> list:
    if plugins is None:
        return []
    return list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]


def _has_checkpoint_io(kwargs: dict[str, Any]) -> bool:
    """Whether the caller chose a CheckpointIO itself (Lightning refuses two): as a plugin, or
    on a strategy object it passed."""
    from lightning.pytorch.plugins.io import CheckpointIO

    strategy = kwargs.get("strategy")
    return (any(isinstance(p, CheckpointIO) for p in _as_list(kwargs.get("plugins")))
            or getattr(strategy, "_checkpoint_io", None) is not None)
