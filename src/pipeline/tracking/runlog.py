"""An ad-hoc run's log where its user looks: `run.log` in its output folder, attached to its
MLflow run(s) when it ends, also after a failure or an interrupt.

The file takes the pipeline's own log records at INFO and above (`pipeline.*`) and every
warning shown (`warnings.warn`, from any library), whatever the console shows: the console
stays as quiet as configured, the file keeps the whole story.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.tracking.mlflow_run import open_client, signals_deferred, top_level_runs

log = logging.getLogger(__name__)

RUN_LOG = "run.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def run_log(out_dir: Path | str) -> Iterator[Path]:
    """Write the block's log to `<out_dir>/run.log`, then attach it to each MLflow run the
    block started that has no parent (a train run, a sweep's, a CV or comparison parent)."""
    path = Path(out_dir) / RUN_LOG
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)  # no file until a first record
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger("pipeline")
    level, quieter = logger.level, logger.getEffectiveLevel()
    as_before = _AsBefore(quieter)
    if quieter > logging.INFO:
        # INFO records must be made for the file, but reach the console's handlers only as before.
        for existing in logger.handlers:
            existing.addFilter(as_before)
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    shown = warnings.showwarning

    def show_and_keep(message, category, filename, lineno, file=None, line=None) -> None:
        shown(message, category, filename, lineno, file, line)
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        handler.handle(logging.makeLogRecord({"name": "py.warnings", "levelno": logging.WARNING,
                                              "levelname": "WARNING", "msg": text}))

    warnings.showwarning = show_and_keep
    first = len(top_level_runs)
    log.info("Log of the run in %s", path.parent)
    try:
        yield path
    except BaseException as err:
        # How it ended, in the file only: the console already hears it from `cli.exits`.
        handler.handle(logging.makeLogRecord({
            "name": log.name, "levelno": logging.ERROR, "levelname": "ERROR", "exc_info": (type(err), err, err.__traceback__),
            "msg": f"Ended by {type(err).__name__}: {err}"}))
        raise
    finally:
        warnings.showwarning = shown
        logger.removeHandler(handler)
        logger.setLevel(level)
        for existing in logger.handlers:
            existing.removeFilter(as_before)
        handler.close()
        if path.exists():
            _attach(path, top_level_runs[first:])


class _AsBefore(logging.Filter):
    """Passes what the "pipeline" logger's handlers showed before it was lowered to INFO: a
    record at `level` or above, or at the level a logger below it sets for itself (e.g. the
    image-folder fetch's progress at INFO)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        while name and name != "pipeline":
            own = logging.root.manager.loggerDict.get(name)
            if isinstance(own, logging.Logger) and own.level != logging.NOTSET:
                return record.levelno >= own.level
            name = name.rpartition(".")[0]
        return record.levelno >= self.level


def _attach(path: Path, runs: list[tuple[str, str]]) -> None:
    """Log `path` into each (tracking URI, run id); a store that refuses costs a warning, never
    the run's own outcome (this runs while a failure or an interrupt is on its way out)."""
    for uri, run_id in runs:
        try:
            with signals_deferred():
                open_client(uri).log_artifact(run_id, str(path))
        except Exception as err:  # noqa: BLE001 - any store error: the file is still on disk
            log.warning("Could not attach %s to MLflow run %s (%s); it stays in the run's folder.", path, run_id,
                        err)
