"""Checkpoints written atomically, so a full disk never costs the previous checkpoint.

Lightning's `TorchCheckpointIO` writes through fsspec, whose local "transaction" writes a
temporary file in $TMPDIR and then `shutil.move`s it over the checkpoint: when $TMPDIR is
on another filesystem than the outputs (a tmpfs /tmp, a mounted volume, a scratch disk),
that move is a copy into the checkpoint's own path, and a full output disk leaves a
truncated `best.ckpt` where the previous good one was. Here the file is written beside
the checkpoint, fsynced and renamed over it (`pipeline.files`), and a full disk is an
`OutputError` naming the folder.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pipeline.files import write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves replace the old file only once the new one is
    complete; remote paths (s3://, gs://) keep Lightning's save, as objects there are
    replaced whole anyway."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()  # serialised first, as Lightning does: torch's writer hides the OSError
        torch.save(checkpoint, buffer)
        write_bytes(path, buffer.getbuffer())
        return None
