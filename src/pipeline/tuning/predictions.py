"""Which validation samples a trial's epoch classified correctly, reported with the epoch
(`selection.CORRECT_KEY`) so that the sweep can test its trials against each other."""

from __future__ import annotations

from typing import Any

import numpy as np
from lightning.pytorch.callbacks import Callback

from pipeline.data.batches import IGNORE_INDEX
from pipeline.tuning.selection import pack


class ValPredictions(Callback):
    """Keeps which validation samples the last validation epoch classified correctly, in the
    validation split's order (padding left out), without a second forward pass: a forward
    hook sees the logits the validation step computes. `packed()` is `pack` of them, or None
    before the first complete validation."""

    def __init__(self) -> None:
        self._logits: Any = None
        self._parts: list[np.ndarray] = []
        self._last: str | None = None
        self._handle: Any = None
        self._complete = True

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._handle = pl_module.register_forward_hook(self._keep)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _keep(self, module: Any, args: Any, output: Any) -> None:
        if not module.training:
            self._logits = output

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._parts, self._complete = [], True

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._logits = None

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        labels = batch[1]
        if self._logits is None or getattr(self._logits, "shape", (None,))[0] != len(labels):
            self._complete = False  # a step that did not call forward once: no vector this epoch
            return
        real = labels != IGNORE_INDEX
        hits = (self._logits.argmax(dim=1) == labels)[real]
        self._parts.append(hits.detach().cpu().numpy())

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return  # a few batches before training: not the split
        self._last = pack(np.concatenate(self._parts)) if self._complete and self._parts else None

    def packed(self) -> str | None:
        return self._last
