"""A sweep as one MLflow run tree: a parent run, one nested child run per Tune trial, and
with `tune.cv` one grandchild run per fold of each trial.

Everything is written from the Ray driver (a `ray.tune.Callback` runs there), so a SQLite
store only ever sees one writer; trials run with tracking off. The trial -> run id map is
saved beside the Ray experiment, so a resumed sweep (`tune.resume=true`) reopens the same
parent and children instead of duplicating them, and ends any child left RUNNING. Each run
is recorded there as soon as it is created, and a resumed sweep also takes in runs of its
tree that a driver killed in between (SIGKILL) had not recorded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ray.tune import Callback

from pipeline.tracking.mlflow_run import TrackedRun, open_client
from pipeline.tracking.provenance import GIT_COMMIT_TAG
from pipeline.training.metrics import EPOCH_METRICS

log = logging.getLogger(__name__)


def map_path(experiment_path: str) -> str:
    """`<experiment>.mlflow_runs.json`, beside the experiment folder rather than in it: Ray
    uploads its driver-side copy of the folder over the storage one on every experiment
    snapshot, and a restored sweep's copy holds the map as it was when the sweep stopped."""
    return f"{experiment_path.rstrip('/')}.mlflow_runs.json"


def read_text(path: str) -> str | None:
    """A small file in local or cloud (s3://, gs://) storage; None if absent."""
    import pyarrow.fs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
    if fs.get_file_info(fs_path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(fs_path) as f:
        return f.readall().decode()


def write_text(path: str, text: str) -> None:
    """Whole or not at all: written beside `path`, then moved over it. A driver killed while
    writing the run map must not leave it empty: the resumed sweep would start a second tree."""
    import pyarrow.fs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
    fs.create_dir(str(Path(fs_path).parent), recursive=True)
    partial = f"{fs_path}.partial"
    with fs.open_output_stream(partial) as f:
        f.write(text.encode())
    fs.move(partial, fs_path)  # a rename on a file system; object stores replace objects whole anyway


def searched_tags(config: dict[str, Any]) -> dict[str, str]:
    """A trial's searched values also as tags, `searched.<key>`: the runs table's tag columns
    and its search box (tags.`searched.optimizer.lr` = '0.01') find them at once. As params they
    are the only ones that differ between a sweep's trials (the rest are its `fixed.*`), so the
    compare view's parallel coordinates plot picks them by default."""
    return {f"searched.{k}": str(v) for k, v in config.items()}


class SweepRuns:
    """The parent and children of one sweep, addressed by id through `TrackedRun`."""

    def __init__(self, target: dict[str, Any], map_path: str) -> None:
        self.target, self.map_path = target, map_path
        saved = read_text(map_path)
        self.ids: dict[str, Any] = json.loads(saved) if saved else {"parent": None, "children": {}}
        self.ids.setdefault("folds", {})  # {trial_id: {fold: run_id}}

    def _save(self) -> None:
        write_text(self.map_path, json.dumps(self.ids, indent=2))

    def _run(self, run_id: str) -> TrackedRun:
        return TrackedRun(open_client(self.target["tracking_uri"]), run_id)

    @property
    def parent(self) -> TrackedRun | None:
        return self._run(self.ids["parent"]) if self.ids["parent"] else None

    def open_parent(self, name: str, params: dict[str, Any], tags: dict[str, str],
                    parent_run_id: str | None = None) -> TrackedRun:
        """The sweep's parent run: the saved one (set RUNNING again) or a new one, itself nested
        under `parent_run_id` when given (a nested cross-validation's outer fold)."""
        if self.ids["parent"]:
            return TrackedRun.resume(tracking_uri=self.target["tracking_uri"], run_id=self.ids["parent"])
        run = TrackedRun.start(**self.target, run_name=name, tags=tags, parent_run_id=parent_run_id)
        self.ids["parent"] = run.run_id
        self._save()  # at once: a run not in the map would be started again by a resumed sweep
        run.log_params(params)
        return run

    def open_child(self, trial_id: str, name: str, params: dict[str, Any], tags: dict[str, str],
                   inputs: list[dict[str, Any]] | None = None) -> tuple[TrackedRun, bool]:
        """The trial's child run and whether it is new (a retried or resumed trial reuses its run)."""
        run_id = self.ids["children"].get(trial_id)
        if run_id:
            return TrackedRun.resume(tracking_uri=self.target["tracking_uri"], run_id=run_id), False
        run = TrackedRun.start(**self.target, run_name=name, tags=tags, parent_run_id=self.ids["parent"])
        self.ids["children"][trial_id] = run.run_id
        self._save()
        run.log_params(params)
        if inputs:
            run.log_inputs(inputs)
        return run, True

    def adopt(self, experiment: str) -> list[str]:
        """Take into the map the runs of the sweep in Ray folder `experiment` (the parent's
        `ray_experiment` tag) that a driver killed between creating and recording them left
        out, so that the resumed sweep reopens them instead of starting duplicates. Returns
        the trial ids of the children taken in."""
        client = open_client(self.target["tracking_uri"])
        found = client.get_experiment_by_name(self.target["experiment"])
        if found is None or "'" in experiment:  # no store yet; or a path MLflow's filter cannot quote
            return []
        ids, before = [found.experiment_id], json.dumps(self.ids)
        if not self.ids["parent"]:
            parents = [r for r in client.search_runs(ids, f"tags.ray_experiment = '{experiment}'", max_results=10)
                       if "mlflow.parentRunId" not in r.data.tags]
            if not parents:
                return []
            self.ids["parent"] = min(parents, key=lambda r: r.info.start_time).info.run_id
        adopted = []
        children = client.search_runs(ids, f"tags.`mlflow.parentRunId` = '{self.ids['parent']}'",
                                      max_results=50_000, order_by=["attributes.start_time ASC"])
        for run in children:
            trial_id = run.data.tags.get("trial_id")
            if trial_id and trial_id not in self.ids["children"]:
                self.ids["children"][trial_id] = run.info.run_id
                adopted.append(trial_id)
        if json.dumps(self.ids) != before:
            self._save()
        if adopted:
            log.warning("Took in the MLflow runs of trials %s, which the sweep's earlier driver had started "
                        "but not recorded when it died.", ", ".join(adopted))
        return adopted

    def log_fold(self, trial_id: str, fold: int, name: str, params: dict[str, Any], tags: dict[str, str],
                 history: list[dict[str, Any]], best: dict[str, float],
                 inputs: list[dict[str, Any]] | None = None) -> str | None:
        """A finished fold of a trial as a run nested under the trial's run, written once: a
        retried or resumed trial that reports the fold again adds nothing. Returns its run id."""
        folds = self.ids["folds"].setdefault(trial_id, {})
        parent_id = self.ids["children"].get(trial_id)
        if str(fold) in folds or parent_id is None:
            return folds.get(str(fold))
        run = TrackedRun.start(**self.target, run_name=name, tags=tags, parent_run_id=parent_id)
        run.log_params(params)
        if inputs:
            run.log_inputs(inputs)
        for row in history:  # the fold's epochs, as a plain train run logs them
            step = int(row["epoch"])
            run.log_metrics({k: float(v) for k, v in row.items()
                             if k != "epoch" and isinstance(v, (int, float))}, step=step)
        run.log_metrics(best)
        run.finish("FINISHED")
        folds[str(fold)] = run.run_id
        self._save()
        return run.run_id

    def child(self, trial_id: str) -> TrackedRun | None:
        run_id = self.ids["children"].get(trial_id)
        return self._run(run_id) if run_id else None

    def end_open_children(self, status: str = "KILLED") -> list[str]:
        """End every child still RUNNING (e.g. after an interrupted sweep); returns their trial ids."""
        ended = []
        for trial_id, run_id in self.ids["children"].items():
            run = self._run(run_id)
            if run.client.get_run(run_id).info.status == "RUNNING":
                run.finish(status)
                ended.append(trial_id)
        return ended


class MlflowTreeCallback(Callback):
    """Creates the parent on setup, a child per trial on its start, logs every reported epoch
    as one batch, and ends each child FINISHED, FAILED (errored) or, from the driver's final
    bookkeeping, KILLED. The parent is finished by `pipeline.tuning.driver` with the best trial."""

    def __init__(self, *, target: dict[str, Any], map_path: str, parent_name: str,
                 parent_params: dict[str, Any], parent_tags: dict[str, str], fixed: dict[str, Any],
                 max_steps: int, step_key: str = "epoch", log_hyperparameters: bool = False,
                 parent_run_id: str | None = None, datasets: dict[str, Any] | None = None) -> None:
        self.target, self.map_path, self.parent_run_id = target, map_path, parent_run_id
        self.parent_name, self.parent_params, self.parent_tags = parent_name, parent_params, parent_tags
        self.fixed, self.log_hyperparameters = fixed, log_hyperparameters
        self.max_steps, self.step_key = max_steps, step_key  # epochs, or folds (tune.cv)
        self.datasets = datasets or {"trial": [], "folds": {}}  # `pipeline.tuning.driver.run_sweep`'s inputs
        # The code version the parent records, on every run of the tree (MLflow's Source column).
        self.code_tags = {k: v for k, v in parent_tags.items() if k in ("git_commit", "git_dirty", GIT_COMMIT_TAG)}
        self.runs: SweepRuns | None = None
        self.state: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the RunConfig (and so this callback) into tuner.pkl for Tuner.restore.
        return {**self.__dict__, "runs": None, "state": {}}

    def setup(self, **info: Any) -> None:
        self.runs = SweepRuns(self.target, self.map_path)
        if self.parent_tags.get("ray_experiment"):  # (a new sweep's folder has no runs yet)
            self.runs.adopt(self.parent_tags["ray_experiment"])
        self.runs.open_parent(self.parent_name, self.parent_params, self.parent_tags, self.parent_run_id)

    def _open(self, trial: Any) -> TrackedRun:
        params = {**{f"fixed.{k}": v for k, v in self.fixed.items()}, **trial.config}
        tags = {"trial_id": trial.trial_id, "trial_name": str(trial), "sweep": self.parent_tags.get("sweep", ""),
                **self.code_tags, **searched_tags(trial.config)}
        run, _ = self.runs.open_child(trial.trial_id, f"{self.parent_name}-{trial.trial_id}", params, tags,
                                      self.datasets["trial"])
        return run

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._open(trial)
        # Also on a new run: a trial whose actor failed before it started (its node lost while
        # it was being placed) comes here first on its retry.
        if trial.num_failures:
            run.set_tags({"restarts": str(trial.num_failures)})
        self.state[trial.trial_id] = {"diverged": False, "stopped": False, "epochs": 0}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run = self.runs.child(trial.trial_id)
        if run is None:
            return
        state = self.state.setdefault(trial.trial_id, {"diverged": False, "stopped": False, "epochs": 0})
        if "gpu_ids" in result:  # the first report of each (re)start of the trial
            run.set_tags({"node": result.get("node_ip", ""), "hostname": result.get("hostname", ""),
                          "gpu_ids": result["gpu_ids"], "node_id": str(result.get("node_id", ""))})
        # val/acc first: the UI's compare view plots the searched params against the first
        # metric a run logged (train/loss otherwise), and accuracy is what people compare.
        keys = sorted(EPOCH_METRICS, key=lambda k: k != "val/acc")
        metrics = {k: float(result[k]) for k in keys if isinstance(result.get(k), (int, float))}
        if "time_this_iter_s" in result:
            metrics["time/epoch_s"] = float(result["time_this_iter_s"])
        # A trial's machine use over the epoch, when the sweep asks (tune.system_metrics).
        metrics.update({k: float(v) for k, v in result.items() if k.startswith("system/")
                        and isinstance(v, (int, float)) and not isinstance(v, bool)})
        if self.log_hyperparameters:  # PBT changes them during the trial: params cannot
            # The values this epoch trained with: PBT's exploit has already given the trial
            # its next config when the callbacks see the result that triggered it.
            config = result.get("config") or trial.config
            metrics.update({f"hp/{k}": float(v) for k, v in config.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if self.step_key == "fold" and "cv/val/acc/std" in result:
            metrics["cv/val/acc/std"] = float(result["cv/val/acc/std"])
        step = int(result.get(self.step_key, result.get("training_iteration", 1) - 1))
        run.log_metrics(metrics, step=step)
        if self.step_key == "fold" and "fold_history" in result:
            self._log_fold(trial, result, step)
        state["epochs"] = step + 1
        state["diverged"] |= bool(result.get("diverged"))
        state["stopped"] = bool(result.get("done"))

    def _log_fold(self, trial: Any, result: dict, fold: int) -> None:
        history = json.loads(result["fold_history"])
        best = {f"best/{k[len('fold/'):]}": float(v) for k, v in result.items()
                if k.startswith("fold/") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        diverged = bool(result.get("diverged"))
        tags = {"trial_id": trial.trial_id, "fold": str(fold), "sweep": self.parent_tags.get("sweep", ""),
                "diverged": str(diverged).lower(), **self.code_tags, **searched_tags(trial.config)}
        params = {**{f"fixed.{k}": v for k, v in self.fixed.items()}, **trial.config, "data.fold": fold}
        self.runs.log_fold(trial.trial_id, fold, f"{self.parent_name}-{trial.trial_id}-fold{fold}", params, tags,
                           history, best, self.datasets["folds"].get(str(fold), []))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self.runs.child(trial.trial_id)
        if run is None:
            return
        state = self.state.get(trial.trial_id, {})
        if state.get("diverged"):
            reason = "diverged"
        elif max(state.get("epochs", 0), trial.last_result.get("training_iteration", 0)) >= self.max_steps:
            reason = "all_folds" if self.step_key == "fold" else "max_epochs"
        elif state.get("stopped"):
            reason = "scheduler"   # ASHA/HyperBand/stopper ended it early
        else:
            reason = "early_stopping"  # the trial's own regularizer.early_stopping
        run.set_tags({"stop_reason": reason, "diverged": str(bool(state.get("diverged"))).lower()})
        run.finish("FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self.runs.child(trial.trial_id) or self._open(trial)  # one that never started too
        error = trial.get_error() or "trial errored"
        run.set_tags({"error": str(error)[-5000:], "restarts": str(trial.num_failures)})
        run.finish("FAILED")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self.runs.child(trial.trial_id)
        if run is not None:
            run.set_tags({"restarts": str(trial.num_failures)})

