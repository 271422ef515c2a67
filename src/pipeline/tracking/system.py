"""CPU, memory, disk and network use (GPU where present) of a run, sampled by MLflow's own
system-metrics monitor into `system/*` metrics, the run page's "System metrics" tab."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.tracking.mlflow_run import TrackedRun

log = logging.getLogger(__name__)

FINISH_TIMEOUT_S = 15  # to stop the monitor and write its last samples


@contextmanager
def system_metrics(run: TrackedRun | None, interval_s: float) -> Iterator[None]:
    """Sample this machine every `interval_s` seconds into `run` while the block runs (nothing
    for no run, or a recorded one: it has no run id to write to until its driver replays it).

    The monitor is a daemon thread writing through its own client; a sample it cannot write
    (the store busy or away) ends the sampling with a warning, never the training. Stopping it
    waits for its request in flight, which against a tracking server that went away retries
    for minutes: the run does not wait longer than FINISH_TIMEOUT_S for it (`TrackedRun` holds
    its own metrics through an outage; these samples are not worth a stalled task)."""
    if run is None or run.run_id is None or run.tracking_uri is None:
        yield
        return
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run.run_id, sampling_interval=interval_s, tracking_uri=run.tracking_uri)
    except ImportError as err:  # psutil (or pynvml for a GPU) missing
        log.warning("No system metrics for run %s: %s (pip install psutil).", run.run_id, err)
        yield
        return
    monitor.start()
    try:
        yield
    finally:
        stopping = threading.Thread(target=monitor.finish, name="system-metrics-finish", daemon=True)
        stopping.start()
        stopping.join(FINISH_TIMEOUT_S)
        if stopping.is_alive():
            log.warning("Run %s: MLflow's system-metrics monitor did not stop within %d s (is the tracking "
                        "server away?); its last samples may be missing.", run.run_id, FINISH_TIMEOUT_S)
