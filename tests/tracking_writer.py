"""One process of the concurrent-logging fault scenario (test_tracking_faults): a run logged
through the pipeline's own `TrackedRun`, as a training process logs it (one batch of an
epoch's metrics per step), starting its run and its logging together with the others."""

from __future__ import annotations

from pipeline.tracking.mlflow_run import TrackedRun

KEYS = ("train/loss", "train/acc", "val/loss", "val/acc", "lr")  # an epoch's row


def log_run(uri: str, experiment: str, name: str, steps: int, barrier) -> None:
    """Open the store and start a run (all writers at once: a new SQLite store is created by
    whichever comes first), then log `steps` epochs' metrics, then end the run."""
    try:
        barrier.wait()
        with TrackedRun.start(tracking_uri=uri, experiment=experiment, run_name=name) as run:
            run.log_params({"writer": name})
            barrier.wait()  # every run started: now all log at once
            for step in range(steps):
                run.log_metrics({key: step / (i + 1) for i, key in enumerate(KEYS)}, step=step)
    except BaseException:
        barrier.abort()  # the others stop waiting for this one
        raise
