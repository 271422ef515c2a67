"""Helpers shared by the sweep tests: override builders, readers of a sweep's outputs
(`trials.csv`, `best.yaml`) and of its MLflow run tree, callbacks injecting a crash or
holding trials until two run at once, and data that vanishes once the driver has read it."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import yaml
from lightning.pytorch.callbacks import Callback
from mlflow import MlflowClient

from pipeline.training.metrics import EPOCH_METRICS

EXPERIMENT = "cnn-pipeline"


def space(**dists: str) -> list[str]:
    """Overrides replacing the whole search space (space keys contain dots)."""
    body = ", ".join(f'{k}: "{v}"' for k, v in dists.items())
    return ["~tune.space", f"+tune.space={{{body}}}"]


def trials(tmp_path: Path) -> list[dict]:
    with (tmp_path / "out" / "results" / "tune" / "trials.csv").open() as f:
        return list(csv.DictReader(f))


def best(tmp_path: Path) -> dict:
    return yaml.safe_load((tmp_path / "out" / "results" / "tune" / "best.yaml").read_text())


def tree(tmp_path: Path) -> tuple[MlflowClient, object, list]:
    """The sweep's one parent run and its children, asserting the experiment holds no other run."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) + 1 == len(runs)
    return client, parents[0], children


def steps(client: MlflowClient, run_id: str, key: str = "val/acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """{step: value} of one metric of a run."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def observe_retries(observe, client: MlflowClient, trials: list[dict], children: list,
                    epochs: int) -> dict[str, int]:
    """The fault record of a sweep whose trials failed and were retried: what it lost is
    measured in its MLflow tree (runs not FINISHED, epochs never logged) and outputs; an
    epoch logged twice was trained again: its trial did not resume from its last checkpoint."""
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    retried = [t for t in trials if int(t["failures"]) >= 1]
    missing, again = 0, {}
    for trial_id, child in by_trial.items():
        for key in EPOCH_METRICS:
            logged = steps(client, child.info.run_id, key)
            missing += len(set(range(epochs)) - set(logged))
            again[trial_id] = max(again.get(trial_id, 0), len(logged) - len(set(logged)))
    observe.saw(f"{len(retried)} of {len(trials)} trials retried (failures: "
                f"{', '.join(t['failures'] for t in trials)}); {sum(again.values())} epochs trained twice; "
                f"runs {', '.join(sorted(c.info.status for c in children))}")
    return observe.lost(runs=len(trials) - sum(c.info.status == "FINISHED" for c in children),
                        metrics=missing, checkpoints=sum(n > 0 for n in again.values()),
                        outputs=sum(t["status"] != "TERMINATED" for t in trials))


def max_overlap(intervals: list[tuple[int, int]]) -> int:
    """The most intervals open at one time (an end at t comes before a start at t)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


class Crash(Callback):
    """Raises RuntimeError at the end (or, `at="start"`, the start) of training epoch `epoch`,
    as a node or process failure would; only in a trainer whose folder ends with `folder`, if
    given (a cv fold). `how="sigkill"` kills the trial's process instead, as the OOM killer would.

    With `marker`, once per sweep: whichever trial first creates that file (atomically)
    crashes, and its retry runs on. Ray workers cannot import tests/, so a sweep test passes
    this class by value: `cloudpickle.register_pickle_by_value(sweeps)`.
    """

    def __init__(self, epoch: int, *, marker: str | None = None, folder: str | None = None,
                 at: str = "end", how: str = "raise") -> None:
        self.epoch, self.marker, self.folder, self.at, self.how = epoch, marker, folder, at, how

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.at == "start":
            self._crash(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.at == "end":
            self._crash(trainer)

    def _crash(self, trainer) -> None:
        if trainer.current_epoch != self.epoch:
            return
        if self.folder is not None and not trainer.default_root_dir.endswith(self.folder):
            return
        if self.marker is not None:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
        if self.how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected crash at epoch {self.epoch}")


class WaitForTwoTrials(Callback):
    """Holds each trial at its start until two trials have started (or a minute has passed).

    With reused actors, short trials could otherwise all finish on the first actor up before
    the second one has imported torch: then no trial would need the second node."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer, pl_module) -> None:
        from ray import tune

        (Path(self.folder) / tune.get_context().get_trial_id()).touch()
        deadline = time.monotonic() + 60
        while len(list(Path(self.folder).iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)


def folds_mode(base, parallel: bool, experiment: str):
    """A copy of config `base` whose folds run in parallel (Ray tasks) or one after another,
    tracked in its own MLflow experiment: the two modes' results and trees side by side."""
    from omegaconf import open_dict

    cfg = base.copy()
    with open_dict(cfg):
        cfg.cv.parallel = parallel
        cfg.tracking.experiment_name = f"{experiment}-{parallel}"
    return cfg


@contextlib.contextmanager
def data_gone_once_loaded(task: ModuleType, data_dir: Path) -> Iterator[list[Path]]:
    """Within the block, `data_dir` moves away as soon as the driver of `task` (the tune or
    cv task's module) has read it with `load_data`, so the trials or folds it then starts
    cannot read it by any path; it comes back at the end. Yields the list of loads."""
    real, hidden, loads = task.load_data, data_dir.with_name(data_dir.name + "-gone"), []

    def load_then_hide(*args, **kwargs):
        data = real(*args, **kwargs)
        data_dir.rename(hidden)
        loads.append(data_dir)
        return data

    task.load_data = load_then_hide
    try:
        yield loads
    finally:
        task.load_data = real
        if hidden.exists():
            hidden.rename(data_dir)
