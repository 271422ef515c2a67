"""Worker set-ups under which importing mlflow fails: parallel folds (Ray tasks or a local
pool's workers) must leave MLflow to the driver. Kept free of heavy imports (mlflow above
all), since a local pool's workers import this module by name."""

from __future__ import annotations

import sys


def block_mlflow() -> None:
    """Importing mlflow fails in this process from now on (a Ray worker's setup hook)."""

    class NoMlflow:
        def find_spec(self, name, path=None, target=None):
            if name == "mlflow" or name.startswith("mlflow."):
                raise ImportError(f"a parallel fold imported {name}: only the CV driver may write to MLflow")
            return None

    sys.meta_path.insert(0, NoMlflow())


def fold_worker_setup() -> None:
    """A local fold worker's own set-up, after `block_mlflow`."""
    from pipeline.tasks import cv

    block_mlflow()
    cv._fold_worker_setup()


def import_mlflow() -> None:
    import mlflow  # noqa: F401
