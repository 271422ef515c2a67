"""The whole dataset cached on the training device, batched there (`data.device_cache`).

On a GPU the fastest small-image trainers keep every image on the device as uint8 (CIFAR-10's
50,000 32x32x3 training images are 154 MB) and make each batch there: one gather of the batch's
rows, one conversion to float, the augmentation as batched tensor ops on the same device
(`pipeline.data.augment`, run by the LightningModule's `on_after_batch_transfer`). The host then
does nothing per batch, and no batch crosses the PCIe bus.

`DeviceBatches` draws the same order as `TensorBatches` (the same permutation per seed and
epoch, the same sharding and padding) and gives the same values (`x.float() / 255` is the
host's table, computed where the images are), so a run trains the same either way. On the CPU
(`data.device_cache=true` there) it exercises exactly the code a GPU runs.

`auto` caches only on a CUDA device, and only when the images take at most `1/DEVICE_SHARE` of
the device memory free when training starts: the rest is the model's, its activations' and the
optimizer's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.data.batches import IGNORE_INDEX, TensorBatches
from pipeline.data.residency import check_device_cache

log = logging.getLogger(__name__)

DEVICE_SHARE = 4
COPY_CHUNK_BYTES = 64 << 20  # host images copied to the device this much at a time (a memory map stays one)


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on a CUDA `device`; None for other devices."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def choose_device_cache(setting: bool | str, nbytes: int, device: torch.device) -> tuple[bool, str]:
    """(whether to cache `nbytes` of images on `device`, why) for `data.device_cache=setting`."""
    check_device_cache(setting)
    size = f"{nbytes / 1e6:,.1f} MB of images"
    if isinstance(setting, bool):
        return setting, f"{size}, {'cached on ' + str(device) if setting else 'batched on the host'} " \
                        f"(data.device_cache={str(setting).lower()})"
    free = free_device_memory(device)
    if free is None:
        return False, f"{size}, batched on the host (data.device_cache=auto: {device} is no CUDA device)"
    keep = nbytes <= free // DEVICE_SHARE
    return keep, (f"{size}, {'cached on' if keep else 'batched on the host, too large for'} {device} "
                  f"(data.device_cache=auto: {'at most' if keep else 'more than'} 1/{DEVICE_SHARE} of its "
                  f"{free / 1e9:,.1f} GB free)")


class DeviceCache:
    """NHWC uint8 `images` and their labels, copied once to `device` as NCHW uint8 and int64."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: torch.device | str) -> None:
        self.device = torch.device(device)
        n = len(images)
        self.images = torch.empty((n, images.shape[3], images.shape[1], images.shape[2]), dtype=torch.uint8,
                                  device=self.device)
        per_image = max(1, int(np.prod(images.shape[1:])))
        step = max(1, COPY_CHUNK_BYTES // per_image)
        for start in range(0, n, step):  # a chunk at a time: a memory-mapped array is never copied whole
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + step]))
            self.images[start : start + step] = chunk.to(self.device).permute(0, 3, 1, 2)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=self.device)

    @property
    def nbytes(self) -> int:
        return self.images.numel()


class DeviceBatches(TensorBatches):
    """`TensorBatches` of a `DeviceCache`: the same batches (order, shards, padding, values),
    gathered and converted on the cache's device. Each pass's order is drawn on the host (a
    permutation of the indices) and copied once; the batches are then slices of it."""

    def __init__(self, cache: DeviceCache, host_images: np.ndarray, labels: np.ndarray,
                 indices: np.ndarray | None = None, **kwargs) -> None:
        super().__init__(host_images, labels, indices, prefetch=0, pin_memory=False, **kwargs)
        self.cache = cache

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, real = self._order()
        if self.shuffle:
            self.epoch += 1
        device = self.cache.device
        rows = torch.from_numpy(self.indices[order.numpy()]).to(device)
        real = real.to(device)
        size = self.batch_size
        for s in range(0, len(rows), size):
            batch = rows[s : s + size]
            x = self.cache.images[batch].float().div_(255.0)  # the host's `_UNIT` table, computed here
            y = self.cache.labels[batch]
            if self.mark_padding:
                y = y.masked_fill(~real[s : s + size], IGNORE_INDEX)
            yield x, y
