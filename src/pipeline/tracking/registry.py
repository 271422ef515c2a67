"""The model registry: each evaluated model becomes a version of one registered model per
experiment and dataset, and the alias `champion` names the version with the best test
accuracy so far, so `models:/<name>@champion` always loads the best model made.

A new version takes the alias only when its test accuracy is strictly higher than the
current champion's (ties keep the older one: a re-run that only matches it changes
nothing). The decision is written where people look: the run's `registry.champion` tag
and the version's description ("champion: 0.993 > 0.989 (version 3)" or "kept version 3:
0.985 <= 0.989").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.tracking.mlflow_run import scoped_tracking_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

CHAMPION = "champion"
SCORE_TAG = "test_acc"  # on each version: what the champion is chosen by
DECISION_TAG = "registry.champion"  # on the run: why the alias moved or stayed
VERSION_TAG = "registry.version"  # on the run: "<name>/<version>"


def model_name(experiment: str, dataset: str) -> str:
    """The registered model's name: stable per experiment and dataset, so every run that
    trains on one dataset in one experiment competes for the same champion."""
    return f"{experiment}-{dataset}"


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    champion: bool
    reason: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{CHAMPION}" if self.champion else f"models:/{self.name}/{self.version}"


def register(client: MlflowClient, name: str, *, run_id: str, model_uri: str, model_id: str | None,
             test_acc: float) -> Registered:
    """Register the model logged at `model_uri` (run `run_id`) as a new version of `name`,
    give it the `champion` alias if its `test_acc` beats the current champion's, and record
    why on the run and the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="The pipeline's models of one experiment and dataset; "
                                                          f"@{CHAMPION} is the one with the best test accuracy.")
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # A SQLite registry resolves a `models:/<model id>` source through MLflow's "current"
    # tracking store, not the client's.
    with scoped_tracking_uri(client.tracking_uri):
        version = client.create_model_version(name, source=model_uri, run_id=run_id, model_id=model_id,
                                              tags={SCORE_TAG: repr(float(test_acc))}).version  # exact: a tie must stay a tie
    current = champion_version(client, name)
    if current is None:
        moved, reason = True, f"champion: {test_acc:.4f} (no champion before)"
    else:
        best, best_version = current
        moved = test_acc > best
        reason = (f"champion: {test_acc:.4f} > {best:.4f} (version {best_version})" if moved
                  else f"kept version {best_version}: {test_acc:.4f} <= {best:.4f}")
    if moved:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.update_model_version(name, version, description=reason)
    client.set_tag(run_id, DECISION_TAG, reason)
    client.set_tag(run_id, VERSION_TAG, f"{name}/{version}")
    log.info("Registered %s version %s; %s", name, version, reason)
    return Registered(name, str(version), moved, reason)


def champion_version(client: MlflowClient, name: str) -> tuple[float, str] | None:
    """(test accuracy, version) of `name`'s champion; None if no version holds the alias
    (or it has no recorded score, as one set by hand might not: it is then beaten by any)."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    score = version.tags.get(SCORE_TAG)
    return (float(score), str(version.version)) if score is not None else None


def resolve_run_id(client: MlflowClient, source: str) -> str:
    """The run id behind `source`: a run id itself, `runs:/<id>/...`, or a registered model
    version `models:/<name>@<alias>` / `models:/<name>/<version>` (the run that logged it)."""
    if source.startswith("runs:/"):
        return source[len("runs:/"):].split("/", 1)[0]
    if not source.startswith("models:/"):
        return source
    rest = source[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = rest.rpartition("/")
        version = client.get_model_version(name, number)
    return version.run_id
