"""One request to an MLflow tracking server before a task starts, so an unreachable server
or refused credentials stop the task in a second with the fix, before any training.

Without it the first MLflow call finds out: the client retries a refused connection with
backoff for about four minutes, then raises a traceback, and a 401 surfaces as a traceback
too. Credentials are MLflow's own (`MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`,
a token, or `~/.mlflow/credentials`), read exactly as the client that then logs reads them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.tracking.mlflow_run import tracking_target

TIMEOUT_S = 10
CREDENTIALS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


def check_tracking(tracking: Mapping[str, Any], root: Path | str) -> None:
    """`check_server` for the `tracking` config block, when tracking is on."""
    if tracking["enabled"]:
        target = tracking_target(tracking, root)
        check_server(target["tracking_uri"], target["experiment"])


def check_server(uri: str, experiment: str) -> None:
    """Raise `ConfigError` unless the http(s) tracking server `uri` answers and lets us read
    `experiment` (which need not exist yet); any other URI is left to MLflow."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    try:
        response = http_request(creds, "/api/2.0/mlflow/experiments/get-by-name", "GET", max_retries=0,
                                timeout=TIMEOUT_S, params={"experiment_name": experiment})
    except MlflowException as err:
        raise ConfigError(f"The MLflow tracking server {uri} cannot be reached ({_reason(err.message)}). "
                          "Start it or fix tracking.tracking_uri (tracking.tracking_uri=sqlite:///mlflow.db "
                          "tracks locally).") from None
    status = response.status_code
    if status == 401:
        problem = (f"refused user {creds.username!r} (HTTP 401: wrong password, or no such user)"
                   if creds.username else "requires credentials and none were given (HTTP 401)")
        raise ConfigError(f"The MLflow tracking server {uri} {problem}: set {CREDENTIALS} in the "
                          "environment to an account on that server.")
    if status == 403:
        raise ConfigError(f"The MLflow tracking server {uri} does not let user {creds.username!r} read "
                          f"experiment {experiment!r} (HTTP 403): ask its admin for EDIT permission, or set "
                          "tracking.experiment_name to an experiment of yours.")
    if status == 200 or (status == 404 and _error_code(response.text) == "RESOURCE_DOES_NOT_EXIST"):
        return
    raise ConfigError(f"{uri} answered HTTP {status} where an MLflow tracking server answers 200: is "
                      f"tracking.tracking_uri the server's address? {response.text[:200]!r}")


def _reason(message: str) -> str:
    # urllib3's "Max retries exceeded ... (Caused by NewConnectionError("HTTPConnection(...): Failed
    # to establish a new connection: [Errno 111] Connection refused"))": the cause is what to act on.
    cause = re.search(r"Caused by \w+\(([\"'])(?:HTTPS?Connection\(.*?\): )?(.*)\1\)\)?$", message)
    return cause.group(2) if cause else message[:300]


def _error_code(text: str) -> str | None:
    try:
        return json.loads(text).get("error_code")
    except (ValueError, AttributeError):
        return None
