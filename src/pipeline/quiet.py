"""Keep third-party chatter out of the way of progress bars and results.

Warnings and log lines that are expected in this pipeline (and say nothing actionable to
its users) are silenced here, in one place, rather than scattered through the code.
"""

from __future__ import annotations

import logging
import warnings

_EXPECTED_WARNINGS = (
    # We keep config.yaml and run.json beside the checkpoints on purpose.
    r"Checkpoint directory .* exists and is not empty",
    # Augmentation lives in the LightningModule's hook by design (it runs on the device).
    r"You have overridden `on_after_batch_transfer`",
    # Lightning-internal deprecation with newer torch; nothing for users to do.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # In-memory batches are fast; Lightning's worker hint is about DataLoaders.
    r"The '.*_dataloader' does not have many workers",
    # Under DDP the module all-reduces val/test sums itself; train metrics stay per rank (the
    # Ray Train reporter averages them) and lr is the same on every rank.
    r"It is recommended to use `self.log\('.*', \.\.\., sync_dist=True\)`",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡")


def quiet() -> None:
    """Silence expected warnings and advertising; idempotent."""
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in rank_zero.filters):
        rank_zero.addFilter(_DropTips())
    # "Creating initial MLflow database tables..." and alembic migrations on first use.
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
