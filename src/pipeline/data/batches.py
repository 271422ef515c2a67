"""Batches by index from one image array, which may be memory-mapped from disk.

The prepared dataset is a single NHWC uint8 array (`pipeline.data.store`), held in memory or
memory-mapped (`data.in_memory`). No split is ever copied whole: a batch gathers its own
images, reading them in file order (its indices sorted, then put back in the shuffled order),
and converts only those to float. Small image datasets need no per-sample Dataset/DataLoader
either (one Python call and one collate per image would be pure overhead): a batch is one
fancy-index and one conversion, made in a background thread (`pipeline.data.prefetch`) while
the previous batch trains.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.data.prefetch import Prefetched

IGNORE_INDEX = -100  # F.cross_entropy's default `ignore_index`: the label of a padded eval sample
# uint8 -> [0, 1] as a table of torch's own `x.float() / 255`, bit for bit. A table lookup is one
# single-threaded NumPy pass that releases the GIL; torch's conversion, called from the prefetch
# thread, would start a second team of OpenMP threads competing with the training step's.
_UNIT = torch.arange(256, dtype=torch.uint8).float().div_(255.0).numpy()
STATS_AT_ONCE_BYTES = 64 << 20  # training splits up to this size: statistics as they always were (float32)
STATS_CHUNK_BYTES = 4 << 20  # larger ones: images read at a time for their exact statistics


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
    """Iterable of `(x, y)` batches of `images[indices]`; `x` float in [0, 1], NCHW. Reshuffled
    each epoch.

    `images` is the whole NHWC uint8 array (in memory or a memory map) and `labels` its int64
    labels; `indices` the rows to batch (all when None). Only a batch's own rows are read.
    With `world_size > 1` each rank takes every `world_size`-th sample of the shared
    permutation, padded so that all ranks run the same number of batches (see `shard`).
    Training counts the padded duplicates, as `DistributedSampler` does; with `mark_padding`
    (evaluation) their labels are `IGNORE_INDEX`, so exact metrics can leave them out.
    With `prefetch > 0` batches are made that many ahead in a background thread (pinned
    when `pin_memory`, for a fast copy to the GPU); the batches are the same either way.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray | None = None, *,
                 batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 mark_padding: bool = False, pin_memory: bool = False, prefetch: int = 1) -> None:
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.mark_padding = rank, world_size, mark_padding
        self.pin_memory, self.prefetch = pin_memory, prefetch
        self.epoch = 0
        self._ahead: weakref.ref[Prefetched] | None = None  # the pass under way, if prefetching

    def set_epoch(self, epoch: int) -> None:
        """Make the shuffle a function of (seed, epoch), so resumed runs see the same order."""
        self.epoch = epoch

    def _order(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.indices)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        return shard(order, self.rank, self.world_size)

    def __len__(self) -> int:
        per_rank = -(-len(self.indices) // self.world_size)
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A generator: the order is drawn at the first batch, after Lightning's `set_epoch`
        # (it calls iter() before its epoch-start hooks).
        self.close()  # an earlier pass left unfinished (a batch limit) stops making batches
        order, real = self._order()
        if self.shuffle:
            self.epoch += 1
        rows, real = self.indices[order.numpy()], real.numpy()
        # Made from these locals only: the producer thread must not keep `self` (and through it
        # the pass's Prefetched) alive, so an abandoned pass is collected and its thread stops.
        images, labels, size, mark, pin = self.images, self.labels, self.batch_size, self.mark_padding, self.pin_memory
        made = (make_batch(images, labels, rows[s : s + size], real[s : s + size] if mark else None, pin_memory=pin)
                for s in range(0, len(rows), size))
        if not self.prefetch:
            yield from made
            return
        ahead = Prefetched(made, depth=self.prefetch)
        self._ahead = weakref.ref(ahead)
        try:
            yield from ahead
        finally:
            ahead.close()

    def close(self) -> None:
        """Stop making batches for a pass that will not be finished (and its thread)."""
        ahead = self._ahead() if self._ahead is not None else None
        if ahead is not None:
            ahead.close()
        self._ahead = None


def make_batch(images: np.ndarray, labels: np.ndarray, rows: np.ndarray, real: np.ndarray | None = None, *,
               pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of `rows`: their images as `to_batch` makes them, and their labels, set to
    `IGNORE_INDEX` where `real` is False (padding)."""
    x = to_batch(gather(images, rows))
    y = torch.from_numpy(labels[rows])
    if real is not None:
        y.masked_fill_(torch.from_numpy(~real), IGNORE_INDEX)
    if pin_memory:
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


def gather(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`images[rows]`, read in ascending row order: a memory map is then read front to back
    (each page once, in the order the disk holds them), and the result put back in `rows`'s order."""
    ascending = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *images.shape[1:]), dtype=images.dtype)
    out[ascending] = images[rows[ascending]]
    return out


def to_batch(images: np.ndarray) -> torch.Tensor:
    """NHWC uint8 images -> an NCHW float batch in [0, 1]: `x.float() / 255` exactly."""
    nchw = images.transpose(0, 3, 1, 2)
    # The layout `np.ascontiguousarray(nchw)` gives, which batches always had: NCHW, except that
    # with one channel NumPy counts the NHWC strides as contiguous already and keeps them.
    # Convolutions pick their kernel, and so their rounding, by the strides: any other layout
    # would change every trained model's numbers.
    keep = nchw.flags.c_contiguous
    out = np.empty(images.shape if keep else nchw.shape, dtype=np.float32)
    np.take(_UNIT, images if keep else nchw, out=out, mode="clip")  # clip (never needed): no output buffer
    x = torch.from_numpy(out)
    return x.permute(0, 3, 1, 2) if keep else x


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A small NHWC uint8 array whole -> contiguous NCHW uint8 tensor, and int64 labels (both
    copies when the arrays are read-only, as those read zero-copy from Ray's object store are:
    torch tensors are writable). For checks on a few images; batches never copy a split whole."""
    x = torch.from_numpy(_writable(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
    return x, torch.from_numpy(_writable(np.asarray(labels, dtype=np.int64)))


def _writable(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable else array.copy()


def channel_stats(images: np.ndarray, indices: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (sample) std in [0, 1] units of `images[indices]` (the training
    split only): the same numbers whether the images are in memory or memory-mapped.

    A split of up to `STATS_AT_ONCE_BYTES` is converted whole and reduced by torch in float32,
    as this always did: digits' results depend on the last bit of these numbers. A larger one
    is read a few megabytes at a time; its pixel sums and sums of squares are exact integers,
    so nothing depends on the chunks, and only the final division rounds.
    """
    indices = np.asarray(indices, dtype=np.int64)
    per_image = math.prod(images.shape[1:])
    if len(indices) * per_image <= STATS_AT_ONCE_BYTES:
        x = to_batch(gather(images, indices))
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    indices = np.sort(indices)
    channels = images.shape[-1]
    chunk = max(1, STATS_CHUNK_BYTES // per_image)
    total = np.zeros(channels, dtype=np.int64)  # 255^2 x 2^40 pixels stays below 2^63
    squares = np.zeros(channels, dtype=np.int64)
    for start in range(0, len(indices), chunk):
        pixels = images[indices[start : start + chunk]].reshape(-1, channels)
        total += pixels.sum(axis=0, dtype=np.int64)
        wide = pixels.astype(np.uint32)
        squares += np.square(wide, out=wide).sum(axis=0, dtype=np.int64)
    n = len(indices) * math.prod(images.shape[1:-1])
    mean = [int(t) / n / 255.0 for t in total]
    # (n sum(x^2) - sum(x)^2) / (n (n - 1)) in Python integers: exact up to the one division.
    var = [(n * int(q) - int(t) ** 2) / (n * (n - 1)) if n > 1 else 0.0 for t, q in zip(total, squares, strict=True)]
    std = [max(math.sqrt(v) / 255.0, 1e-6) for v in var]
    return mean, std
