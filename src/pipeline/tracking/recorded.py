"""A run recorded where the MLflow store must not be opened, and written later by the one
process that writes to the store.

Parallel cross-validation folds run as Ray tasks, possibly on other machines. If each wrote
its run itself, a SQLite store would take several writers at once (and a worker on another
node may not reach the store at all). A fold trains with a `RecordedRun` instead: it takes
the calls a `TrackedRun` takes and keeps them, with their times and the artifacts' bytes,
and the driver replays them into a real run, so the tree is the one a sequential run writes.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.tracking.mlflow_run import TrackedRun


def _now() -> int:
    return int(time.time() * 1000)


class RecordedRun(TrackedRun):
    """A `TrackedRun` that stores nothing: `begin` takes what `TrackedRun.start` would, the
    logging calls are kept in order, and `replay` writes them all into a real run. It has no
    run id (the store gives one on replay) and cannot take a model (`mlflow.pytorch`)."""

    def __init__(self) -> None:
        super().__init__(client=None, run_id=None)  # type: ignore[arg-type]
        self.start_args: dict[str, Any] | None = None
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.status: str | None = None
        self.end_time: int | None = None

    def begin(self, *, run_name: str | None, tags: dict[str, str], parent_run_id: str | None) -> RecordedRun:
        self.start_args = {"run_name": run_name, "tags": dict(tags), "parent_run_id": parent_run_id,
                           "start_time": _now()}
        return self

    @property
    def tracking_uri(self) -> str | None:
        return None

    def log_params(self, params: dict[str, Any]) -> None:
        self.calls.append(("log_params", (dict(params),)))

    def log_metrics(self, metrics: dict[str, float], step: int = 0, *, timestamp: int | None = None) -> None:
        self.calls.append(("log_metrics", (dict(metrics), step, timestamp or _now())))

    def log_metric_rows(self, rows: list[tuple[dict[str, float], int, int]]) -> None:
        self.calls.extend(("log_metrics", (dict(metrics), step, timestamp)) for metrics, step, timestamp in rows)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.calls.append(("set_tags", (dict(tags),)))

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        # The bytes, not the path: the driver may run on another machine.
        self.calls.append(("log_artifact", (Path(path).name, Path(path).read_bytes(), artifact_path)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.calls.append(("log_text", (text, artifact_file)))

    def log_inputs(self, inputs: list[dict[str, Any]]) -> None:
        self.calls.append(("log_inputs", ([dict(item) for item in inputs],)))

    def finish(self, status: str = "FINISHED", *, end_time: int | None = None) -> None:
        # Train ends the run and evaluate reopens it: the last end is the run's.
        self.status, self.end_time = status, end_time or _now()

    @property
    def begun(self) -> bool:
        return self.start_args is not None

    def replay(self, target: Mapping[str, Any]) -> TrackedRun:
        """Write the recorded run into the store `target` (`tracking_target`); returns it, ended."""
        run = TrackedRun.start(**target, **self.start_args)
        # The folder lasts until the run has ended: while its server is away, a run holds
        # artifacts by path and sends them when it can (at the latest, as it ends).
        with tempfile.TemporaryDirectory(prefix="recorded-run-") as folder:
            try:
                rows: list[tuple[dict[str, float], int, int]] = []  # consecutive log_metrics, sent as one
                for i, (name, args) in enumerate(self.calls):
                    if name == "log_metrics":
                        rows.append(args)
                        continue
                    if rows:
                        run.log_metric_rows(rows)
                        rows = []
                    if name == "log_artifact":
                        filename, content, artifact_path = args
                        path = Path(folder) / str(i) / filename  # one folder each: names may repeat
                        path.parent.mkdir()
                        path.write_bytes(content)
                        run.log_artifact(path, artifact_path)
                    else:
                        getattr(run, name)(*args)
                if rows:
                    run.log_metric_rows(rows)
            except BaseException:
                run.finish("FAILED")
                raise
            # A record that never ended did not end well (its worker returned without finishing).
            run.finish(self.status or "KILLED", end_time=self.end_time)
        return run
