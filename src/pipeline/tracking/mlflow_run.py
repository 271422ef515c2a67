"""One MLflow run, driven through `MlflowClient` (no global "active run" state), so a train
stage, an evaluate stage in another process, and Ray trials can each address a run by id.

mlflow is imported where it is used: it costs over a second to import, and a Ray Tune trial
(tracking off: the driver writes) imports this module through the train task.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import STOPPED, ConfigError
from pipeline.tracking.liveness import process_tags, reap_gone_runs

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
BATCH = 100  # MLflow's limit on params (and tags) per log_batch call
METRIC_BATCH = 1000  # and on metrics


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """Relative sqlite paths are taken from the project root (not the working directory)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str((root / uri[len(prefix):]).resolve())
    if "://" not in uri:
        raise ConfigError(f"tracking.tracking_uri={uri!r} is not a URI; use sqlite:///mlflow.db or http://host:5000 "
                          "(MLflow 3 no longer accepts a plain folder as a store).")
    return uri


def resolve_artifact_location(location: str | None, uri: str, root: Path) -> str | None:
    """Artifacts beside a local database; a server (http) chooses its own artifact store."""
    if not location or uri.startswith(("http://", "https://", "databricks")):
        return None
    if "://" in location:
        return location
    path = Path(location)
    return (path if path.is_absolute() else root / path).resolve().as_uri()


def tracking_target(tracking: Mapping[str, Any], root: Path | str) -> dict[str, Any]:
    """`TrackedRun.start`'s store arguments from the `tracking` config block, relative paths
    taken from the project `root`."""
    uri = resolve_tracking_uri(tracking["tracking_uri"], Path(root))
    return {"tracking_uri": uri, "experiment": tracking["experiment_name"],
            "artifact_location": resolve_artifact_location(tracking.get("artifact_location"), uri, Path(root))}


def get_experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment's id, creating it (race-safely: trials may start together) if needed."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class TrackedRun:
    """A handle on one MLflow run with batched logging; use as a context manager so any
    exception ends the run FAILED (a stop signal, SIGINT or SIGTERM: KILLED) instead of
    leaving it RUNNING."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    @classmethod
    def start(cls, *, tracking_uri: str, experiment: str, artifact_location: str | None = None,
              run_name: str | None = None, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, start_time: int | None = None) -> TrackedRun:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        reap_gone_runs(client)
        experiment_id = get_experiment_id(client, experiment, artifact_location)
        tags = {**(tags or {}), **process_tags()}  # so that the next command can tell if we died
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id, start_time=start_time, run_name=run_name, tags=tags)
        return cls(client, run.info.run_id)

    @classmethod
    def resume(cls, *, tracking_uri: str, run_id: str) -> TrackedRun:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        reap_gone_runs(client)
        run = cls(client, run_id)
        run.set_tags(process_tags())  # this process writes it now: before RUNNING, or it could be reaped
        client.update_run(run_id, status="RUNNING")
        return run

    @property
    def tracking_uri(self) -> str:
        return self.client.tracking_uri

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self._log_batches("params", [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0, *, timestamp: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = timestamp or int(time.time() * 1000)
        self._log_batches("metrics", [Metric(k, float(v), now, step) for k, v in metrics.items()],
                          METRIC_BATCH)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._log_batches("tags", [RunTag(k, str(v)) for k, v in tags.items()])

    def _log_batches(self, kind: str, items: list, size: int = BATCH) -> None:
        """``log_batch`` in chunks MLflow accepts (``kind``: params, metrics or tags)."""
        for i in range(0, len(items), size):
            self.client.log_batch(self.run_id, **{kind: items[i : i + size]})

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2), artifact_file)

    def finish(self, status: str = "FINISHED", *, end_time: int | None = None) -> None:
        self.client.set_terminated(self.run_id, status=status, end_time=end_time)

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.set_tags({"error": f"{exc_type.__name__}: {exc}"[:5000]})
            self.finish("KILLED" if issubclass(exc_type, STOPPED) else "FAILED")


