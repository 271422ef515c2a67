"""Where to look at an MLflow run: its id and the address of its page in the MLflow UI.

Every command that creates runs ends with these lines, so a user has the id that
`pipeline report run_id=<id>` and `transfer.source=runs:/<id>/model` take without opening
`models/run.json`. A server's runs are at its own address; a local store (the default
`sqlite:///mlflow.db`) has no address until `mlflow ui` serves it, at MLflow's default one.
"""

from __future__ import annotations

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI that serves `tracking_uri`."""
    base = tracking_uri.rstrip("/") if is_server(tracking_uri) else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def ui_hint(tracking_uri: str) -> str | None:
    """How to serve a local store at `LOCAL_UI` (None for a server: it serves itself)."""
    return None if is_server(tracking_uri) else f"(start the UI with: mlflow ui --backend-store-uri {tracking_uri})"


def experiment_of(tracking_uri: str, run_id: str) -> str:
    """The id of the experiment holding `run_id`."""
    from pipeline.tracking.mlflow_run import open_client

    return open_client(tracking_uri).get_run(run_id).info.experiment_id


def run_lines(tracking_uri: str, run_id: str, *, label: str = "run", hint: bool = True) -> list[str]:
    """`<label>: <id>  <url>`, then (for a local store, with `hint`) how to open that url."""
    lines = [f"{label}: {run_id}  {run_url(tracking_uri, experiment_of(tracking_uri, run_id), run_id)}"]
    how = ui_hint(tracking_uri) if hint else None
    return [*lines, how] if how else lines
