"""Ray Tune sweeps end to end, with a real local Ray (2 CPUs) and a real SQLite MLflow store:
early stopping by ASHA, the MLflow run tree, a diverging trial, a crashed and retried trial,
and an interrupted sweep resumed without duplicate runs. Plus the checks made before Ray starts.

Trials use the MLP (or MiniVGG where trials must last a few seconds) on digits.
"""

from __future__ import annotations

import json
import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import sweeps
from pipeline.errors import ConfigError
from pipeline.tasks.data import ensure_data
from pipeline.tasks.tune import tune
from pipeline.tuning.driver import SweepInterrupted
from pipeline.tuning.plan import plan_sweep

MLP = ["model=mlp", "tune.num_cpus=2", "tune.max_concurrent_trials=2", "tune.metric=val/acc", "tune.mode=max"]  # ranked by accuracy


# ---------------------------------------------------------------------------- before Ray

@pytest.mark.parametrize("overrides, message", [
    (sweeps.space(**{"optimizer.lr": "logunifom(1e-4, 1e-1)"}), r"tune\.space\.optimizer\.lr=.*loguniform\(low, high\)"),
    (sweeps.space(**{"optimizer.lr": "loguniform(0, 1)"}), r"tune\.space\.optimizer\.lr.*0 < low"),
    (sweeps.space(**{"optimizer.lrr": "uniform(0.1, 0.2)"}), r"tune\.space\.optimizer\.lrr: no such config key"),
    (sweeps.space(model="uniform(1, 2)"), r"tune\.space\.model: model is a config group"),
    (sweeps.space(model="choice[mlp, nosuch]"), r"(?s)tune\.space\.model: model=nosuch does not compose.*lenet5"),
    (sweeps.space(**{"regularizer.dropout": "uniform(0.0, 1.5)"}), r"regularizer\.dropout=1\.49.* out of range"),
    (["tune.search_alg=grid"], r"search_alg=grid tries listed values only"),
    (["tune.scheduler=pbt", "tune.pbt.mutate=[scheduler.decay]"], r"tune\.pbt\.mutate"),
    (["tune.metric=val/f1"], r"tune\.metric='val/f1' is not one of"),
    (["tune.address=ray://head:10001"], r"tune\.address=ray://head:10001 .* tune\.storage_path is unset"),
])
def test_bad_sweeps_fail_before_ray_starts(cfg_factory, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweep(cfg_factory(overrides))


def test_group_choices_are_composed_in_the_driver(cfg_factory):
    plan = plan_sweep(cfg_factory(["tune=architecture"]))
    assert set(plan.blocks["model"]) == {"mlp", "lenet5", "minivgg"}
    assert plan.blocks["model"]["lenet5"]["name"] == "lenet5"
    assert plan.base["tracking"]["enabled"] is False and plan.base["trainer"]["max_epochs"] == 10
    assert all(Path(plan.base["paths"][k]).is_absolute() for k in ("root", "data_dir", "out_dir"))
    default = plan_sweep(cfg_factory())
    assert default.fixed == {"scheduler": "exponential"} and default.base["scheduler"]["name"] == "exponential"


def test_a_sweep_keeps_its_ray_experiment_beside_its_other_outputs(cfg_factory, tmp_path):
    """The DVC stage (out_dir = the root) in results/ray; an ad-hoc sweep in its own folder."""
    adhoc = plan_sweep(cfg_factory())  # out_dir: tmp_path/out, as Hydra's run folder
    assert Path(adhoc.storage) == tmp_path / "out" / "results" / "ray"
    assert adhoc.results == tmp_path / "out" / "results" / "tune"
    assert adhoc.resume_overrides == f"tune.resume=true hydra.run.dir={tmp_path / 'out'}"
    stage_cfg = cfg_factory()
    stage_cfg.paths.out_dir = str(tmp_path)  # the DVC stage's: outputs at the project root
    stage = plan_sweep(stage_cfg)
    assert Path(stage.storage) == tmp_path / "results" / "ray" and stage.resume_overrides == "tune.resume=true"
    shared = plan_sweep(cfg_factory([f"tune.storage_path={tmp_path / 'shared'}"]))
    assert Path(shared.storage) == tmp_path / "shared"


@pytest.mark.parametrize(("step_key", "label"), [("epoch", "epoch"), ("fold", "folds so far")])
def test_curves_count_epochs_and_folds_from_one(monkeypatch, tmp_path, step_key, label):
    """Stored from 0 as Lightning counts, drawn from 1 as the summaries and the report say."""
    from pipeline.tuning import results

    drawn = {}
    monkeypatch.setattr(results, "save_figure", lambda fig, path: drawn.setdefault("ax", fig.axes[0]) and path)
    trials = [{"trial_id": "a"}, {"trial_id": "b"}]
    curves = [{"trial_id": t, "step": s, "val/loss": 1.0 / (s + 1)} for t in ("a", "b") for s in range(3)]
    results.curves_png(results.Outcome(trials=trials, curves=curves, best={"trial_id": "b"}), "val/loss",
                       tmp_path / "curves.png", step_key)
    ax = drawn["ax"]
    assert [list(line.get_xdata()) for line in ax.lines] == [[1, 2, 3], [1, 2, 3]]
    assert ax.get_xlabel() == label and [line.get_label() for line in ax.lines] == ["a", "b (best)"]


def test_cluster_without_shared_storage_is_refused(cfg_factory, monkeypatch):
    import ray

    from pipeline.tuning.driver import check_storage

    plan = plan_sweep(cfg_factory())
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    with pytest.raises(ConfigError, match="2 nodes but tune.storage_path is the local folder"):
        check_storage(plan)


def test_runs_a_killed_driver_had_not_recorded_are_taken_in(tmp_path: Path):
    """A driver SIGKILLed between creating a run and writing it to the sweep's run map: the
    resumed sweep reopens that run instead of starting a second one (the tree stays one)."""
    from pipeline.tracking.mlflow_run import TrackedRun
    from pipeline.tuning.mlflow_tree import SweepRuns, map_path

    target = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": sweeps.EXPERIMENT,
              "artifact_location": None}
    experiment = str(tmp_path / "ray" / "sweep-1")
    other = TrackedRun.start(**target, run_name="another sweep", tags={"ray_experiment": experiment + "0"})
    parent = TrackedRun.start(**target, run_name="parent", tags={"ray_experiment": experiment})
    child = TrackedRun.start(**target, run_name="t0", tags={"trial_id": "t0"}, parent_run_id=parent.run_id)
    assert not Path(map_path(experiment)).exists()  # killed before it recorded either

    runs = SweepRuns(target, map_path(experiment))
    assert runs.adopt(experiment) == ["t0"]
    assert runs.open_parent("parent", {}, {}).run_id == parent.run_id != other.run_id
    run, new = runs.open_child("t0", "t0", {}, {})
    assert run.run_id == child.run_id and not new
    again = SweepRuns(target, map_path(experiment))  # what the adoption recorded stays recorded
    assert again.ids["parent"] == parent.run_id and again.ids["children"] == {"t0": child.run_id}
    assert again.adopt(experiment) == [] and not list(Path(map_path(experiment)).parent.glob("*.partial"))


# ---------------------------------------------------------------------------- sweeps

@pytest.mark.integration
@pytest.mark.slow
def test_asha_sweep_is_one_mlflow_tree_and_feeds_train(local_ray, cfg_factory, tmp_path: Path):
    from pipeline.tasks.train import train

    cfg = cfg_factory([*MLP, "tune.num_samples=6", "tune.max_epochs=4", "tune.asha.grace_period=1"])
    ensure_data(cfg)
    best = tune(cfg)

    trials = sweeps.trials(tmp_path)
    assert len(trials) == 6 and {t["status"] for t in trials} == {"TERMINATED"}
    epochs = {t["trial_id"]: int(t["epochs"]) for t in trials}
    assert min(epochs.values()) < 4 <= max(epochs.values()), epochs  # ASHA stopped some early
    assert any(t["stop_reason"] == "scheduler" for t in trials)
    scores = {t["trial_id"]: float(t["best_val_acc"]) for t in trials}
    assert best["trial_id"] == max(scores, key=scores.get) or scores[best["trial_id"]] == max(scores.values())
    written = sweeps.best(tmp_path)
    assert written["trial_id"] == best["trial_id"] and written["overrides"]["scheduler"] == "exponential"
    assert set(written["overrides"]) == {"scheduler", "optimizer.lr", "scheduler.decay", "regularizer.dropout"}
    assert written["config"]["optimizer"]["lr"] == written["overrides"]["optimizer.lr"]
    curves = json.loads((tmp_path / "out/results/tune/curves.json").read_text())
    assert len(curves) == sum(epochs.values()) and {"trial_id", "step", "epoch", "val_acc", "val_loss"} <= set(curves[0])

    client, parent, children = sweeps.tree(tmp_path)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial_id"] == best["trial_id"] == written["trial_id"]
    assert float(parent.data.tags["best_val/acc"]) == pytest.approx(best["value"], rel=1e-5)
    assert written["mlflow_parent_run_id"] == parent.info.run_id
    assert parent.data.params["tune.scheduler"] == "asha" and parent.data.params["model.name"] == "mlp"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"trials.csv", "curves.png", "best.yaml"}
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(epochs)  # one child per trial
    assert {t["trial_id"]: t["mlflow_run_id"] for t in trials} == {c.data.tags["trial_id"]: c.info.run_id
                                                                 for c in children}
    for child in children:
        trial_id = child.data.tags["trial_id"]
        assert child.info.status == "FINISHED", trial_id
        assert sweeps.steps(client, child.info.run_id) == list(range(epochs[trial_id]))
        assert child.data.tags["node"] and child.data.tags["stop_reason"] in ("scheduler", "max_epochs")
        assert "optimizer.lr" in child.data.params and child.data.params["fixed.scheduler"] == "exponential"

    # The train task starts from the best trial and says where from.
    train(cfg)
    config = yaml.safe_load((tmp_path / "out/models/config.yaml").read_text())
    assert config["optimizer"]["lr"] == pytest.approx(written["overrides"]["optimizer.lr"])
    assert config["scheduler"]["name"] == "exponential" and config["trainer"]["max_epochs"] == 2
    run_id = json.loads((tmp_path / "out/models/run.json").read_text())["run_id"]
    assert client.get_run(run_id).data.tags["tuned_from"] == parent.info.run_id


@pytest.mark.integration
@pytest.mark.slow
def test_diverging_trial_is_marked_and_never_best(local_ray, cfg_factory, tmp_path: Path):
    cfg = cfg_factory([*MLP, "optimizer=sgd", "tune.num_samples=1", "tune.max_epochs=3", "tune.scheduler=fifo",
                       *sweeps.space(**{"optimizer.lr": "grid[1e6, 0.05]"})])
    ensure_data(cfg)
    best = tune(cfg)

    trials = {float(t["optimizer.lr"]): t for t in sweeps.trials(tmp_path)}
    bad, good = trials[1e6], trials[0.05]
    assert bad["diverged"] == "1" and bad["stop_reason"] == "diverged" and math.isnan(float(bad["best_val_acc"]))
    assert int(bad["epochs"]) < 3 and bad["status"] == "TERMINATED"
    assert good["diverged"] == "0" and best["trial_id"] == good["trial_id"]

    client, parent, children = sweeps.tree(tmp_path)
    assert parent.data.tags["best_trial_id"] == good["trial_id"]
    child = next(c for c in children if c.data.tags["trial_id"] == bad["trial_id"])
    assert child.info.status == "FINISHED" and child.data.tags["stop_reason"] == "diverged"
    assert math.isnan(child.data.metrics["val/acc"])


@pytest.mark.integration
@pytest.mark.slow
def test_retried_trial_keeps_every_epoch_in_its_results(local_ray, cfg_factory, tmp_path: Path, monkeypatch):
    """A retried trial's result.json is the driver's own, whole. Ray's JSON logger would copy
    the storage path's result.json over it on the retry, and that copy is only as recent as
    the last experiment-state save. Here saves come only with every second checkpoint
    (CheckpointConfig.num_to_keep=2; no periodic ones): after epoch 1, not after epoch 2, so
    a crash at the start of epoch 3 would lose epoch 2 (trials.csv: 3 epochs of 4)."""
    from ray import cloudpickle

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "3600")
    cloudpickle.register_pickle_by_value(sweeps)  # the workers cannot import tests/
    cfg = cfg_factory([*MLP, "tune.num_samples=1", "tune.max_epochs=4", "tune.scheduler=fifo", "tune.max_failures=1",
                       *sweeps.space(**{"optimizer.lr": "grid[0.003]"})])
    ensure_data(cfg)
    tune(cfg, trial_callbacks=[sweeps.Crash(3, marker=str(tmp_path / "crashed"), at="start")])

    assert (tmp_path / "crashed").exists()
    (trial,) = sweeps.trials(tmp_path)
    assert trial["status"] == "TERMINATED" and trial["failures"] == "1" and trial["epochs"] == "4", trial
    (results,) = list(tmp_path.glob("out/results/ray/*/*/result.json"))
    epochs = [json.loads(line)["epoch"] for line in results.read_text().splitlines() if line.strip()]
    assert epochs == [0, 1, 2, 3]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("how", [
    pytest.param("raise", marks=pytest.mark.fault(
        "3. Sweep: trial crashed", fault="a trial raises at the end of epoch 1 (tune.max_failures=1)",
        expected="retried from its epoch-1 checkpoint; one FINISHED run per trial, every epoch logged once")),
    pytest.param("sigkill", marks=pytest.mark.fault(
        "3. Sweep: trial worker killed", fault="SIGKILL to a trial's Ray worker at the end of epoch 1 "
                                              "(tune.max_failures=1)",
        expected="retried from its epoch-1 checkpoint; one FINISHED run per trial, every epoch logged once")),
])
def test_crashed_trial_is_retried_from_its_checkpoint(local_ray, cfg_factory, tmp_path: Path, how: str, observe):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sweeps)  # the workers cannot import tests/
    cfg = cfg_factory([*MLP, "tune.num_samples=1", "tune.max_epochs=3", "tune.scheduler=fifo", "tune.max_failures=1",
                       *sweeps.space(**{"optimizer.lr": "grid[0.001, 0.003]"})])
    ensure_data(cfg)
    tune(cfg, trial_callbacks=[sweeps.Crash(1, marker=str(tmp_path / "crashed"), how=how)])

    trials = sweeps.trials(tmp_path)
    client, parent, children = sweeps.tree(tmp_path)
    sweeps.observe_retries(observe, client, trials, children, epochs=3)
    assert {t["status"] for t in trials} == {"TERMINATED"} and len(trials) == 2
    assert sorted(int(t["failures"]) for t in trials) == [0, 1]
    assert all(int(t["epochs"]) == 3 for t in trials)
    crashed = next(t for t in trials if t["failures"] == "1")

    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    child = next(c for c in children if c.data.tags["trial_id"] == crashed["trial_id"])
    assert child.data.tags["restarts"] == "1"
    # Resumed from the epoch-1 checkpoint: epochs 0 and 1 once, then epoch 2 (not 0, 1 again).
    assert sweeps.steps(client, child.info.run_id) == [0, 1, 2]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.fault("3. Sweep: checkpoint commit lost",
                   fault="SIGKILL to a trial's Ray worker after the driver took its epoch-0 (no commit yet) or "
                         "epoch-1 result, before Tune committed that result's checkpoint (as a lost node does; "
                         "tune.max_failures=1)",
                   expected="retried from the checkpoint Tune had not committed; every epoch trained and "
                            "logged once, iterations equal to epochs")
@pytest.mark.parametrize("at_epoch", [0, 1])
def test_trial_lost_before_its_checkpoint_commit_resumes_from_it(local_ray, cfg_factory, tmp_path: Path, observe,
                                                                 monkeypatch, at_epoch: int):
    """Tune takes an epoch's result, then commits its checkpoint in a second call to the
    trial: a trial lost between the two was retried from the commit before, and trained and
    logged that epoch again (the node-lost scenario's "1 checkpoint lost"). The kill here
    comes from the driver, in the result's callback, so it always falls between the two. After
    epoch 0 there is no commit at all, and Tune retries the trial from nothing."""
    import os

    from pipeline.tuning import recovery

    record = recovery.record_reported_callback
    killed: list[int] = []

    def record_then_kill() -> object:
        class KillBeforeCommit(type(record())):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                super().on_trial_result(iteration, trials, trial, result, **info)
                if result["epoch"] == at_epoch and not killed:
                    killed.append(result["pid"])
                    os.kill(result["pid"], signal.SIGKILL)

        return KillBeforeCommit()

    monkeypatch.setattr(recovery, "record_reported_callback", record_then_kill)
    cfg = cfg_factory([*MLP, "tune.num_samples=1", "tune.max_epochs=4", "tune.scheduler=fifo", "tune.max_failures=1",
                       *sweeps.space(**{"optimizer.lr": "grid[0.003]"})])
    ensure_data(cfg)
    tune(cfg)

    assert killed, "the trial was never killed"
    trials = sweeps.trials(tmp_path)
    client, _, children = sweeps.tree(tmp_path)
    lost = sweeps.observe_retries(observe, client, trials, children, epochs=4)
    (trial,) = trials
    assert trial["status"] == "TERMINATED" and trial["failures"] == "1" and trial["epochs"] == "4", trial
    (child,) = children
    assert sweeps.steps(client, child.info.run_id) == [0, 1, 2, 3]  # the killed epoch not trained again
    (results,) = list(tmp_path.glob("out/results/ray/*/*/result.json"))
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    assert [(r["epoch"], r["training_iteration"]) for r in rows] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert lost == {"runs": 0, "metrics": 0, "checkpoints": 0, "outputs": 0}


def _finished_children(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM runs r JOIN tags t ON r.run_uuid = t.run_uuid "
                               "WHERE t.key = 'mlflow.parentRunId' AND r.status = 'FINISHED'").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.integration
@pytest.mark.slow
def test_interrupted_sweep_resumes_without_duplicates(local_ray, cfg_factory, tmp_path: Path):
    overrides = ["model=minivgg", "tune.num_cpus=2", "tune.max_concurrent_trials=2", "tune.num_samples=5",
                 "tune.max_epochs=3", "tune.scheduler=fifo"]
    cfg = cfg_factory(overrides)
    ensure_data(cfg)
    params = tmp_path / "sweep.yaml"
    OmegaConf.save(cfg, params)

    # The DVC stage's entry point in its own process (and its own Ray), stopped like Ctrl+C
    # once the first trials have finished.
    log = (tmp_path / "stage.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli.stages", "tune", str(params)], cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while _finished_children(tmp_path / "mlflow.db") < 1 and proc.poll() is None:
        assert time.monotonic() < deadline, (tmp_path / "stage.log").read_text()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == SweepInterrupted.exit_code, (tmp_path / "stage.log").read_text()[-3000:]
    log.close()

    client, parent, children = sweeps.tree(tmp_path)
    assert parent.info.status == "KILLED" and parent.data.tags.get("interrupted") == "true"
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    done_before = {c.data.tags["trial_id"]: c for c in children if c.info.status == "FINISHED"}
    assert 1 <= len(done_before) < 5
    assert not (tmp_path / "out/results/tune/best.yaml").exists()  # no best of half a sweep

    resumed = cfg_factory([*overrides, "tune.resume=true"])
    best = tune(resumed)

    client, parent2, children = sweeps.tree(tmp_path)
    assert parent2.info.run_id == parent.info.run_id and parent2.info.status == "FINISHED"
    trial_ids = [c.data.tags["trial_id"] for c in children]
    assert len(trial_ids) == len(set(trial_ids)) == 5  # no duplicate children
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        steps = sweeps.steps(client, child.info.run_id)
        assert sorted(set(steps)) == [0, 1, 2], (child.data.tags["trial_id"], steps)
        if child.data.tags["trial_id"] in done_before:  # finished trials were not run again
            assert steps == [0, 1, 2] and child.info.end_time == done_before[child.data.tags["trial_id"]].info.end_time
    trials = sweeps.trials(tmp_path)
    assert {t["status"] for t in trials} == {"TERMINATED"}
    assert {t["trial_id"]: t["mlflow_run_id"] for t in trials} == {c.data.tags["trial_id"]: c.info.run_id
                                                                 for c in children}
    assert sweeps.best(tmp_path)["trial_id"] == best["trial_id"]
