"""Keep third-party chatter out of the way of progress bars and results.

Warnings and log lines that are expected in this pipeline (and say nothing actionable to
its users) are silenced here, in one place, rather than scattered through the code. What
stays: the training progress bar, a sweep's status table (once a minute), one line per event.
`pipeline -v ...` (or PIPELINE_VERBOSE=1 in the environment, e.g. for `dvc repro`) gives
everything back.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from types import ModuleType

# The switch lives in the environment so that every process of a job sees it: Ray's trial
# workers and DVC's stage processes inherit it from the command that started them.
VERBOSE_ENV = "PIPELINE_VERBOSE"

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

# Lightning's accelerator header, printed by every Trainer (so once per fold, per model of a
# comparison): the machine does not change within a process, so it is said once.
_ONCE = ("GPU available:", "TPU available:", "HPU available:", "IPU available:")
# Lightning's internal step of every fit with a step-based schedule: no news for a user.
_DROPPED = ("Loading `train_dataloader` to estimate number of stepping batches",
            "Saving pytorch model by Pickle or CloudPickle format")

# Environment defaults: MLflow's per-file "Downloading artifacts" bars (14 lines for one
# report on a run id), read by MLflow at each download.
_QUIET_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

# Loggers whose INFO lines are bookkeeping: MLflow's first-use database creation and
# migrations, its system-metrics monitor (four lines per run: started, skipped GPU, ...), and
# Ray's "Started a local Ray instance." on every sweep and parallel cross-validation.
_INFO_LOGGERS = ("mlflow.store.db.utils", "alembic", "mlflow.system_metrics", "ray._private.worker")
# Ray's notice on every start of a local instance that token authentication, its default, is
# on. (Setting RAY_AUTH_MODE=token instead, as the notice suggests, does not work once `ray` is
# imported: Ray reads its config at import, and the instance then fails to start.)
_WARNING_LOGGERS = ("ray._private.authentication.authentication_token_setup",)

# Lightning logs through one of these, whichever of `lightning` and `pytorch_lightning` was
# imported last (see `import_mlflow_pytorch`).
_RANK_ZERO = ("lightning.pytorch.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero")
# Loggers that `_Chatter` filters.
_FILTERED = (*_RANK_ZERO, "mlflow.pytorch")


def verbose() -> bool:
    """Whether the user asked for everything (`pipeline -v`, PIPELINE_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


class _Chatter(logging.Filter):
    """Drops Lightning's advertising and internal steps, repeats of its header, and MLflow's
    caution on every pickled model (we pickle on purpose, a network users can `.eval()`, and
    read it back weights-only: `pipeline.models.checkpoints.load_mlflow_model`)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("💡") or msg.startswith(_DROPPED):
            return False
        if msg.startswith(_ONCE):
            if msg in self.seen:
                return False
            self.seen.add(msg)
        return True


_chatter = _Chatter()


def quiet() -> None:
    """Silence expected warnings, advertising and repeated lines (unless `verbose()`); idempotent.
    Every way in calls it first, before anything is imported that logs."""
    if verbose():
        for name in _FILTERED:
            logging.getLogger(name).removeFilter(_chatter)
        for name in (*_INFO_LOGGERS, *_WARNING_LOGGERS):
            logging.getLogger(name).setLevel(logging.NOTSET)
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _FILTERED:
        logger = logging.getLogger(name)
        if _chatter not in logger.filters:
            logger.addFilter(_chatter)
    for name in _INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in _WARNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_worker(*more: str) -> None:
    """In a worker process (Ray's, a local fold pool's), where trainings run side by side and
    the driver reports their progress: Lightning's per-Trainer lines ("GPU available",
    "Checkpoint successfully created") and the loggers `more` at WARNING."""
    import lightning.pytorch  # noqa: F401  # first: its import sets its loggers' levels

    for name in ("lightning.pytorch", "lightning.fabric", *more):
        logging.getLogger(name).setLevel(logging.WARNING)


_AUTOLOG = "mlflow.pytorch._lightning_autolog"  # imports pytorch_lightning


def import_mlflow_pytorch() -> ModuleType:
    """`mlflow.pytorch`, without what importing it does to this process's logging.

    Its import calls `logging.basicConfig` (a handler on the root logger: from then on every
    propagating logger prints in another format, `INFO:name:message`, the pipeline's warnings
    twice) and imports `pytorch_lightning`, which points Lightning's shared rank-zero logger at
    its own logger: Lightning's lines then bypass `quiet`'s filter (the litmodels tip appears).
    Both are put back as they were. And where nothing imported Lightning yet (evaluate, report:
    processes that never train), its autologging module is kept out: it is what imports
    `pytorch_lightning`, seconds of start-up for a callback this pipeline never uses (MLflow
    swallows the ImportError, as when Lightning is not installed).
    """
    import lightning_utilities.core.rank_zero as rank_zero

    root = logging.getLogger()
    handlers, level, rank_zero_log = list(root.handlers), root.level, rank_zero.log
    block = "mlflow.pytorch" not in sys.modules and not {"lightning", "pytorch_lightning"} & sys.modules.keys()
    if block:
        sys.modules[_AUTOLOG] = None  # type: ignore[assignment]  # `import` of a None entry raises ImportError
    try:
        import mlflow.pytorch
    finally:
        if block:
            del sys.modules[_AUTOLOG]  # mlflow.pytorch.autolog() can still import it, if ever called
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
        rank_zero.log = rank_zero_log
    return mlflow.pytorch
