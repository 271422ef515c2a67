"""The Lightning data module of one image array: train/val/test batches by index set.

Apart from `pipeline.data.batches` because it is the only data code that needs Lightning:
what evaluates, reports or validates imports the batches without it (Lightning takes seconds
to import).
"""

from __future__ import annotations

import logging
import weakref

import lightning as L
import numpy as np
import torch

from pipeline.data.batches import TensorBatches
from pipeline.data.device import DeviceBatches, DeviceCache, choose_device_cache

log = logging.getLogger(__name__)


class ArrayDataModule(L.LightningDataModule):
    """Train/val/test batches of one image array (in memory or memory-mapped) and index sets.

    With `device_cache` (`data.device_cache`: auto, true or false) the whole array is copied to
    the training device once, when training starts, and batched there (`pipeline.data.device`);
    the batches are the same either way.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, train_idx: np.ndarray, val_idx: np.ndarray,
                 test_idx: np.ndarray | None = None, batch_size: int, eval_batch_size: int, seed: int,
                 device_cache: bool | str = "auto") -> None:
        super().__init__()
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.parts = {"train": train_idx, "val": val_idx, "test": test_idx}
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.device_cache = device_cache
        self.cache: DeviceCache | None = None
        self._cache_decided = False
        self._train: TensorBatches | None = None
        self._made: weakref.WeakSet[TensorBatches] = weakref.WeakSet()

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _device_cache(self) -> DeviceCache | None:
        """The images on the training device, copied the first time batches are asked for (the
        device is known then), if `device_cache` says so."""
        if not self._cache_decided:
            device = self._device()
            keep, why = choose_device_cache(self.device_cache, self.images.nbytes, device)
            log.info(why)
            self.cache = DeviceCache(self.images, self.labels, device) if keep else None
            self._cache_decided = True
        return self.cache

    def _batches(self, part: str, **kwargs) -> TensorBatches:
        rank, world = self._rank()
        cache = self._device_cache()
        if cache is not None:
            batches: TensorBatches = DeviceBatches(cache, self.images, self.labels, self.parts[part], rank=rank,
                                                   world_size=world, **kwargs)
        else:
            pin = self._device().type == "cuda"
            batches = TensorBatches(self.images, self.labels, self.parts[part], rank=rank, world_size=world,
                                    pin_memory=pin, **kwargs)
        self._made.add(batches)
        return batches

    def train_dataloader(self) -> TensorBatches:
        self._train = self._batches("train", batch_size=self.batch_size, shuffle=True, seed=self.seed)
        return self._train

    def set_epoch(self, epoch: int) -> None:
        if self._train is not None:
            self._train.set_epoch(epoch)

    def _eval(self, part: str) -> TensorBatches:
        return self._batches(part, batch_size=self.eval_batch_size, shuffle=False, mark_padding=True)

    def val_dataloader(self) -> TensorBatches:
        return self._eval("val")

    def test_dataloader(self) -> TensorBatches:
        return self._eval("test")

    def close(self) -> None:
        """Stop every prefetch thread of the batches made here."""
        for batches in list(self._made):
            batches.close()

    # Lightning calls these when a run ends and when it fails (a KeyboardInterrupt included):
    # passes it left unfinished must not keep a thread making batches, and the device cache
    # gives its memory back.
    def teardown(self, stage: str) -> None:
        self.close()
        self.cache, self._cache_decided = None, False

    def on_exception(self, exception: BaseException) -> None:
        self.close()
        self.cache, self._cache_decided = None, False
