"""One MLflow run, driven through `MlflowClient` (no global "active run" state), so a train
stage, an evaluate stage in another process, and Ray trials can each address a run by id.

mlflow is imported where it is used: it costs over a second to import, and a Ray Tune trial
(tracking off: the driver writes) imports this module through the train task.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import STOPPED, ConfigError
from pipeline.tracking.liveness import process_tags, reap_gone_runs
from pipeline.tracking.provenance import source_tags

if TYPE_CHECKING:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
BATCH = 100  # MLflow's limit on params (and tags) per log_batch call
METRIC_BATCH = 1000  # and on metrics
PROBE_TIMEOUT_S = 5  # one request, no retries: is the server back?
INCOMPLETE_TAG = "tracking.incomplete"
# The experiment's type as MLflow records it: model training, not GenAI. The UI's type selector
# shows it; MLflow 3.17's UI opens an experiment by its own GenAI / Model training switch instead
# (remembered by the browser, or `?workflowType=machine_learning` in the address: README).
KIND_TAG, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"
# (tracking URI, run id) of every run without a parent this process started, in order: the
# runs an ad-hoc command's log is attached to (`tracking.runlog`).
top_level_runs: list[tuple[str, str]] = []


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
    """The experiment's id, creating it (race-safely: trials may start together) if needed,
    and marked as model development (`KIND_TAG`) unless someone chose its kind already."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={KIND_TAG: MODEL_DEVELOPMENT})
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    kind = experiment.tags.get(KIND_TAG)
    # The UI writes its own guesses as "..._inferred" (or "no_inferred_type"): a guess, not a choice.
    if kind is None or kind.endswith("_inferred") or kind == "no_inferred_type":
        client.set_experiment_tag(experiment.experiment_id, KIND_TAG, MODEL_DEVELOPMENT)
    return experiment.experiment_id


def open_client(tracking_uri: str) -> MlflowClient:
    """An `MlflowClient` on `tracking_uri`, its store opened (and created) one process at a time.

    The client opens its store at once, and on a SQLite file that does not exist yet, that
    creates every table and runs MLflow's migrations. Processes started together on a new
    project (`pipeline train` in a shell loop, a queue of `dvc exp run`) each found the file
    missing or half-migrated and failed ("table ... already exists", "duplicate column").
    Once the store exists, opening it only reads and SQLite's own locking is enough.
    """
    from mlflow.tracking import MlflowClient

    with _store_creation_lock(tracking_uri):
        return MlflowClient(tracking_uri)


@contextmanager
def scoped_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's "current" tracking URI (which `runs:/` and `models:/` URIs, `log_model` and
    `load_model` resolve against) set to `uri` for a block. The environment variable scopes
    it; `mlflow.set_tracking_uri` would leak into the rest of the process."""
    import os

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


@contextmanager
def _store_creation_lock(uri: str) -> Iterator[None]:
    """An exclusive `flock` on a SQLite store's folder (other stores: nothing to hold).

    The folder, not the database file: SQLite's own POSIX locks on the file are all dropped
    when any descriptor of it in the process is closed, so we must not open it ourselves; and
    a lock file would be one more file in the project.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        yield
        return
    import fcntl
    import os

    folder = Path(uri[len(prefix):].split("?", 1)[0]).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, then reach their handlers as sent.

    A stop signal raises its exception wherever the main thread is; in the middle of a write
    to a SQLite store it left the write transaction open, the lock held by this very process,
    and the run could not then be marked KILLED ("database is locked", exit 1). Only the main
    thread receives Python signal handlers, so elsewhere there is nothing to defer."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is None:  # a handler not set from Python: leave it be
            continue
        previous[signum] = handler
        signal.signal(signum, lambda received, frame: caught.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in caught:
            signal.raise_signal(signum)


class TrackedRun:
    """A handle on one MLflow run with batched logging; use as a context manager so any
    exception ends the run FAILED (a stop signal, SIGINT or SIGTERM: KILLED) instead of
    leaving it RUNNING.

    A tracking server that goes away mid-run does not stop training. MLflow's client retries
    each request (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, 7 by default, with exponential backoff:
    about four minutes), so a restart within that time costs only the wait. What a longer
    outage keeps out is held here and sent, in order, when the server is back: neither
    dropped nor raised. Raising would end a training run whose checkpoints and curves are
    safe on local disk, for the sake of a few numbers per epoch; dropping would leave a
    silent gap. While the server is away each new call costs one quick request to see
    whether it is back (not four more minutes of retries). Held metrics keep their steps and
    times, and re-sending a batch that had in fact landed adds nothing (the store drops
    identical values). If the server is still away when the run ends, a warning says what
    the run lacks, and a `tracking.incomplete` tag too if the server can be told.
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.held: list[tuple[str, Any]] = []  # calls an outage kept from the server, in order
        self.server_away = False

    @classmethod
    def start(cls, *, tracking_uri: str, experiment: str, artifact_location: str | None = None,
              run_name: str | None = None, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, start_time: int | None = None) -> TrackedRun:
        client = open_client(tracking_uri)
        reap_gone_runs(client)
        experiment_id = get_experiment_id(client, experiment, artifact_location)
        # process_tags: so that the next command can tell if we died.
        tags = {**source_tags(), **(tags or {}), **process_tags()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id, start_time=start_time, run_name=run_name, tags=tags)
        if not parent_run_id:
            top_level_runs.append((tracking_uri, run.info.run_id))
        return cls(client, run.info.run_id)

    @classmethod
    def resume(cls, *, tracking_uri: str, run_id: str) -> TrackedRun:
        client = open_client(tracking_uri)
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

        self._send("params", [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0, *, timestamp: int | None = None) -> None:
        import time

        self.log_metric_rows([(metrics, step, timestamp or int(time.time() * 1000))])

    def log_metric_rows(self, rows: list[tuple[dict[str, float], int, int]]) -> None:
        """Many steps' metrics, each row (metrics, step, timestamp), in as few requests as
        MLflow takes (`METRIC_BATCH` a request): a replayed fold's 40 epochs are one request,
        not 40 (each a transaction of its own on SQLite)."""
        from mlflow.entities import Metric

        self._send("metrics", [Metric(k, float(v), timestamp, step) for metrics, step, timestamp in rows
                               for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._send("tags", [RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        self._send("artifact", (str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send("text", (text, artifact_file))

    def log_inputs(self, inputs: list[dict[str, Any]]) -> None:
        """The datasets the run used (`tracking.datasets.dataset_input`), as MLflow datasets."""
        self._send("inputs", [dict(item) for item in inputs])

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2), artifact_file)

    def _send(self, kind: str, payload: Any) -> None:
        """Queue one call (metrics, params, tags: a list; artifact, text: arguments) behind any
        an outage holds, and send what the queue holds."""
        self.held.append((kind, payload))
        self._flush(quick=True)

    def _flush(self, *, quick: bool) -> bool:
        """Send the held calls in order; False if the tracking server is unreachable (the rest
        stay held). `quick`: while the server is known to be away, ask once whether it is back
        rather than wait out MLflow's retries again."""
        if not self.held:
            return True
        if quick and self.server_away and not self._server_answers():
            return False
        from mlflow.exceptions import MlflowException

        what = _missing(self.held)
        try:
            while self.held:
                with signals_deferred():
                    self._call(*self.held[0])
                    self.held.pop(0)
        except MlflowException as err:
            if not self._is_outage(err):
                self.held.pop(0)  # refused, not kept out: the caller's error, once; the calls behind it go on
                raise
            if not self.server_away:
                log.warning("The MLflow tracking server %s cannot be reached (%s). Training goes on; what run %s "
                            "logs is kept until the server is back.", self.tracking_uri, _cause(err.message),
                            self.run_id)
            self.server_away = True
            return False
        if self.server_away:
            log.warning("The MLflow tracking server %s is back: logged the %s that run %s held meanwhile.",
                        self.tracking_uri, what, self.run_id)
        self.server_away = False
        return True

    def _call(self, kind: str, payload: Any) -> None:
        if kind == "artifact":
            self.client.log_artifact(self.run_id, *payload)
        elif kind == "text":
            self.client.log_text(self.run_id, *payload)
        elif kind == "inputs":
            from pipeline.tracking.datasets import to_entities

            self.client.log_inputs(self.run_id, datasets=to_entities(payload))
        else:  # log_batch, in chunks MLflow accepts
            size = METRIC_BATCH if kind == "metrics" else BATCH
            for i in range(0, len(payload), size):
                self.client.log_batch(self.run_id, **{kind: payload[i : i + size]})

    def _is_outage(self, err: MlflowException) -> bool:
        """A request to a tracking server that got no answer after MLflow's retries (refused,
        reset, timed out, or 5xx to the end). A server that answered with an error (a
        `RestException`: bad value, no permission) is a real error, and so is any error of a
        local store."""
        from mlflow.exceptions import RestException

        return self.tracking_uri.startswith(("http://", "https://")) and not isinstance(err, RestException)

    def _server_answers(self) -> bool:
        """One request, no retries: does the tracking server answer at all (any HTTP status)?"""
        from mlflow.exceptions import MlflowException
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        try:
            http_request(get_default_host_creds(self.tracking_uri), "/api/2.0/mlflow/runs/get", "GET",
                         max_retries=0, timeout=PROBE_TIMEOUT_S, params={"run_id": self.run_id})
        except MlflowException:
            return False
        return True

    def finish(self, status: str = "FINISHED", *, end_time: int | None = None) -> None:
        """End the run with `status`, after sending whatever an outage held (with MLflow's full
        retries: the last chance). If the server is still away, say what it lacks and leave
        the run as it is: each further request would wait out the retries again, and the
        task's local outputs are complete."""
        if self._flush(quick=False):
            with signals_deferred():
                self.client.set_terminated(self.run_id, status=status, end_time=end_time)
            return
        note = _missing(self.held)
        log.warning("Run %s on %s is incomplete: the tracking server could not be reached to log %s. The run's "
                    "local outputs (metrics/train.json, plots/) have them all.", self.run_id, self.tracking_uri, note)
        if self._server_answers():  # back just now: mark the gap, then end the run
            self.client.set_tag(self.run_id, INCOMPLETE_TAG, f"not logged: {note}")
            self.client.set_terminated(self.run_id, status=status, end_time=end_time)
        else:
            log.warning("Run %s stays RUNNING on %s: the server could not be told it ended (%s).", self.run_id,
                        self.tracking_uri, status)

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.set_tags({"error": f"{exc_type.__name__}: {exc}"[:5000]})
            self.finish("KILLED" if issubclass(exc_type, STOPPED) else "FAILED")


def _cause(message: str) -> str:
    # MLflow's "API request to ... failed with exception HTTPConnectionPool(...): Max retries
    # exceeded ... (Caused by NewConnectionError(...: [Errno 111] Connection refused))".
    return message.rsplit(": ", 1)[-1].rstrip(")\"'") if "Caused by" in message else message[:300]


def _missing(held: list[tuple[str, Any]]) -> str:
    """What held calls would log, for a person: '12 metric values (steps 3-5), 1 artifact'."""
    counts: dict[str, int] = {}
    steps: set[int] = set()
    for kind, payload in held:
        if kind == "metrics":
            steps |= {m.step for m in payload}
        name = {"metrics": "metric value", "params": "param", "tags": "tag", "inputs": "dataset"}.get(kind, "artifact")
        counts[name] = counts.get(name, 0) + (len(payload) if kind in ("metrics", "params", "tags", "inputs") else 1)
    parts = [f"{n} {name}{'s' if n != 1 else ''}" + (f" (steps {min(steps)}-{max(steps)})" if steps and
                                                      name == "metric value" else "")
             for name, n in counts.items()]
    return ", ".join(parts)
