"""In-memory batching: whole datasets as tensors, batches by index slicing.

Small image datasets fit in memory many times over, so a per-sample Dataset/DataLoader
(one Python call and one collate per image) is pure overhead. Batches here are one
fancy-index into a uint8 tensor and one float conversion.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import numpy as np
import torch

IGNORE_INDEX = -100  # F.cross_entropy's default `ignore_index`: the label of a padded eval sample


def shard(order: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's indices from the shared `order`, and which of them are real samples.

    As `DistributedSampler` does, the order is padded with its own first entries to a multiple
    of `world_size`, so every rank gets `ceil(n / world_size)` samples and thus as many batches:
    DDP all-reduces gradients every step, and a rank with a batch fewer leaves the others
    waiting forever. Across ranks every sample is real exactly once.
    """
    n = len(order)
    total = -(-n // world_size) * world_size
    if total > n:  # so n > 0; repeating covers more padding than data (n < world_size / 2)
        order = torch.cat([order, order.repeat(-(-(total - n) // n))[: total - n]])
    positions = torch.arange(total // world_size) * world_size + rank
    return order[positions], positions < n


class TensorBatches:
    """Iterable of `(x, y)` batches; `x` float in [0, 1], NCHW. Reshuffled each epoch.

    With `world_size > 1` each rank takes every `world_size`-th sample of the shared
    permutation, padded so that all ranks run the same number of batches (see `shard`).
    Training counts the padded duplicates, as `DistributedSampler` does; with `mark_padding`
    (evaluation) their labels are `IGNORE_INDEX`, so exact metrics can leave them out.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, shuffle: bool,
                 seed: int = 0, rank: int = 0, world_size: int = 1, mark_padding: bool = False) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.mark_padding = rank, world_size, mark_padding
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the shuffle a function of (seed, epoch), so resumed runs see the same order."""
        self.epoch = epoch

    def _order(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        return shard(order, self.rank, self.world_size)

    def __len__(self) -> int:
        per_rank = -(-len(self.labels) // self.world_size)
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, real = self._order()
        if self.shuffle:
            self.epoch += 1
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            labels = self.labels[idx]
            if self.mark_padding:
                labels.masked_fill_(~real[start : start + self.batch_size], IGNORE_INDEX)
            yield self.images[idx].float().div_(255.0), labels


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """NHWC uint8 numpy -> contiguous NCHW uint8 tensor, and int64 labels (both copies when
    the arrays are read-only, as those read zero-copy from Ray's object store are: torch
    tensors are writable)."""
    x = torch.from_numpy(_writable(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
    return x, torch.from_numpy(_writable(np.asarray(labels, dtype=np.int64)))


def _writable(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable else array.copy()


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units (from the training split only)."""
    x = images.float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return mean.tolist(), std.tolist()


class ArrayDataModule(L.LightningDataModule):
    """Train/val/test batches from one in-memory array and index sets."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, train_idx: np.ndarray, val_idx: np.ndarray,
                 test_idx: np.ndarray | None = None, batch_size: int, eval_batch_size: int, seed: int) -> None:
        super().__init__()
        x, y = to_tensors(images, labels)
        self.parts = {"train": train_idx, "val": val_idx, "test": test_idx}
        self.x, self.y = x, y
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self._train: TensorBatches | None = None

    def subset(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(_writable(np.asarray(self.parts[part], dtype=np.int64)))
        return self.x[idx], self.y[idx]

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> TensorBatches:
        rank, world = self._rank()
        self._train = TensorBatches(*self.subset("train"), batch_size=self.batch_size, shuffle=True,
                                    seed=self.seed, rank=rank, world_size=world)
        return self._train

    def set_epoch(self, epoch: int) -> None:
        if self._train is not None:
            self._train.set_epoch(epoch)

    def _eval(self, part: str) -> TensorBatches:
        rank, world = self._rank()
        return TensorBatches(*self.subset(part), batch_size=self.eval_batch_size, shuffle=False,
                             rank=rank, world_size=world, mark_padding=True)

    def val_dataloader(self) -> TensorBatches:
        return self._eval("val")

    def test_dataloader(self) -> TensorBatches:
        return self._eval("test")
