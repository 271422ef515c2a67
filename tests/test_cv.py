"""Cross-validation: fold isolation, aggregates equal to the fold runs, parallel == sequential
(results and MLflow tree, with the driver as the only writer)."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from mlflow import MlflowClient
from scipy import stats

import no_mlflow
import sweeps
from pipeline.data.splits import load_splits
from pipeline.tasks import cv as cv_task
from pipeline.tasks.cv import cross_validate
from pipeline.tasks.data import ensure_data
from pipeline.tasks.fold_pool import ProcessPool
from pipeline.training.metrics import file_row
from procs import start_stage, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FOLDS = 3


@pytest.fixture
def cv_cfg(cfg_factory):
    cfg = cfg_factory([f"data.split.folds={FOLDS}", "model=lenet5", "trainer.max_epochs=2"])
    ensure_data(cfg)
    return cfg


def test_folds_are_isolated_and_aggregates_match_child_runs(cv_cfg, tmp_path: Path):
    result = cross_validate(cv_cfg)
    out = tmp_path / "out"
    saved = json.loads((out / "metrics" / "cv.json").read_text())
    # The file spells `val/acc` `val_acc`; the run id and the folds' time are returned (for
    # the summary and a comparison), not saved: a DVC metrics file holds no timings.
    run_id = result.pop("mlflow_run_id")
    assert result.pop("time_s") > 0
    assert saved == json.loads(json.dumps(file_row(result)))
    acc = saved["val_acc"]
    assert len(acc["values"]) == FOLDS
    assert acc["ci_low"] <= acc["mean"] <= acc["ci_high"]

    splits = load_splits(tmp_path / "data" / "splits" / "digits")
    trainval = set(np.concatenate([splits.train, splits.val]).tolist())
    test = set(splits.test.tolist())
    for fold in range(FOLDS):
        idx = np.load(out / "cv" / f"fold_{fold}" / "models" / "indices.npz")
        train, val = set(idx["train"].tolist()), set(idx["val"].tolist())
        assert val == set(splits.folds[fold].tolist())  # validates on its own fold
        assert not train & val  # never trains on its own validation data
        assert not (train | val) & test  # never sees the test set
        assert train | val == trainval

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnn-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["fold"] for r in children) == [str(i) for i in range(FOLDS)]
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
    child_acc = [r.data.metrics["best/val/acc"] for r in sorted(children, key=lambda r: r.data.tags["fold"])]
    np.testing.assert_allclose(acc["values"], child_acc)
    assert acc["mean"] == pytest.approx(np.mean(child_acc))
    assert acc["std"] == pytest.approx(np.std(child_acc, ddof=1))
    assert parent.data.metrics["cv/val/acc/mean"] == pytest.approx(acc["mean"])
    test_acc = [r.data.metrics["test/acc"] for r in sorted(children, key=lambda r: r.data.tags["fold"])]
    np.testing.assert_allclose(saved["test_acc"]["values"], test_acc)

    # The fold ensemble: the folds' own test probabilities averaged, scored on the test labels,
    # in cv.json beside the mean single-fold accuracy and on the CV parent run.
    from pipeline.data.store import read_raw

    labels = read_raw(tmp_path / "data" / "raw" / "digits").labels[splits.test]
    fold_probs = [np.load(out / "cv" / f"fold_{fold}" / "metrics" / "test_probs.npy") for fold in range(FOLDS)]
    assert all(p.shape == (len(splits.test), 10) for p in fold_probs)
    by_hand = float((np.mean(fold_probs, axis=0).argmax(axis=1) == labels).mean())
    assert saved["ensemble_models"] == FOLDS
    assert saved["ensemble_test_acc"] == pytest.approx(by_hand)
    assert 0 < saved["ensemble_test_loss"] and 0 <= saved["ensemble_test_f1_macro"] <= 1
    assert saved["test_acc"]["mean"] == pytest.approx(np.mean(test_acc))
    assert parent.data.metrics["cv/ensemble/test/acc"] == pytest.approx(by_hand)
    assert parent.data.metrics["cv/ensemble/models"] == FOLDS


def test_fold_ensemble_averages_softmax_outputs_by_hand():
    """Two models each right on 2 of 3 images; their mean probabilities are right on all 3."""
    labels = np.array([0, 1, 1])
    a = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    b = np.array([[0.4, 0.6], [0.1, 0.9], [0.3, 0.7]])
    out = cv_task.fold_ensemble([a, b], labels, ["x", "y"])
    assert out["ensemble/models"] == 2 and out["ensemble/test/acc"] == 1.0
    assert out["ensemble/test/loss"] == pytest.approx(-(2 * np.log(0.65) + np.log(0.75)) / 3)
    assert cv_task.fold_ensemble([b, a], labels, ["x", "y"]) == out          # order does not matter
    assert cv_task.fold_ensemble([a], labels, ["x", "y"])["ensemble/test/acc"] == pytest.approx(2 / 3)


def test_a_recorded_run_is_written_as_it_happened(tmp_path: Path):
    """What a parallel fold sends back: calls in order, artifacts' bytes at the time, its
    times, and a failure in a second `with` (evaluate after train) ending it FAILED."""
    import pickle

    from pipeline.tracking.mlflow_run import tracking_target
    from pipeline.tracking.recorded import RecordedRun

    artifact = tmp_path / "train.json"
    artifact.write_text('{"epochs": 2}')
    record = RecordedRun().begin(run_name="fold-0", tags={"fold": "0"}, parent_run_id=None)
    with record:
        record.log_params({"data.fold": 0})
        for step, acc in enumerate((0.5, 0.7)):
            record.log_metrics({"val/acc": acc}, step=step)
        record.log_artifact(artifact)
    artifact.write_text("changed")
    with pytest.raises(ValueError), record:
        raise ValueError("boom")
    record = pickle.loads(pickle.dumps(record))  # as Ray returns it

    target = tracking_target({"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "e",
                              "artifact_location": str(tmp_path / "artifacts")}, tmp_path)
    run = record.replay(target)
    written = run.client.get_run(run.run_id)
    assert (written.info.run_name, written.info.status) == ("fold-0", "FAILED")
    assert written.data.tags["fold"] == "0" and written.data.tags["error"] == "ValueError: boom"
    assert written.data.params == {"data.fold": "0"}
    history = run.client.get_metric_history(run.run_id, "val/acc")  # the epochs sent as one batch
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.7)]
    assert [m.timestamp for m in history] == [args[2] for name, args in record.calls if name == "log_metrics"]
    assert written.info.start_time == record.start_args["start_time"]
    assert written.info.end_time == record.end_time
    local = run.client.download_artifacts(run.run_id, "train.json", str(tmp_path / "down"))
    assert Path(local).read_text() == '{"epochs": 2}'


@pytest.fixture
def no_mlflow_ray():
    """A local Ray (2 CPUs) whose workers cannot import mlflow; `cross_validate` uses it."""
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(no_mlflow)  # Ray's workers cannot import tests/
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"worker_process_setup_hook": no_mlflow.block_mlflow})
    with pytest.raises(ray.exceptions.RayTaskError, match="only the CV driver"):
        ray.get(ray.remote(lambda: __import__("mlflow")).remote())  # the hook holds
    yield
    ray.shutdown()


@pytest.fixture
def no_mlflow_pool(monkeypatch):
    """No Ray in this process: `cross_validate` runs parallel folds in its local pool, whose
    workers cannot import mlflow."""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()
    monkeypatch.setattr(cv_task, "_fold_worker_setup", no_mlflow.fold_worker_setup)
    with ProcessPool(1, setup=no_mlflow.fold_worker_setup) as pool:
        [(_, error)] = list(pool.run([("mlflow", no_mlflow.import_mlflow, ())]))
    assert "only the CV driver" in str(error)  # the set-up holds


def _tree(client: MlflowClient, experiment: str) -> list[dict]:
    """The CV parent then its fold runs, each as name, status, params, tags, per-step metrics
    and artifacts (time/* values differ from run to run: their steps only)."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 1 + len(children) == 1 + FOLDS
    out = []
    for run in [parent, *sorted(children, key=lambda r: r.data.tags["fold"])]:
        run_id = run.info.run_id
        metrics = {key: sorted((m.step, None if key.startswith("time/") else m.value)
                               for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}
        out.append({"name": run.info.run_name, "status": run.info.status, "params": run.data.params,
                    "tags": {k: v for k, v in run.data.tags.items() if k != "mlflow.parentRunId"},
                    "metrics": metrics, "artifacts": sorted(a.path for a in client.list_artifacts(run_id)),
                    "run_id": run_id, "span": (run.info.start_time, run.info.end_time)})
    return out


@pytest.mark.parametrize(("parallel", "cpus", "num_cpus", "address", "nested", "folds", "expected"), [
    ("auto", 2, None, None, False, 5, True),    # two 1-CPU folds fit on a 2-core machine
    ("auto", 1, None, None, False, 5, False),   # one at a time: Ray would only cost its start
    ("auto", 1, 2, None, False, 5, True),       # tune.num_cpus, when set, is the local Ray's size
    ("auto", 3, None, None, False, 1, False),   # a single fold (data.fold set, say)
    ("auto", 1, None, "auto", False, 5, True),  # a cluster: its CPUs are not this machine's
    ("auto", 8, None, None, True, 5, False),    # nested CV: each outer fold's sweep is the parallel part
    (True, 1, None, None, False, 5, True),
    (False, 8, None, "auto", False, 5, False),
])
def test_parallel_auto_runs_folds_side_by_side_where_two_fit(monkeypatch, parallel, cpus, num_cpus, address, nested,
                                                             folds, expected):
    monkeypatch.setattr(cv_task.os, "cpu_count", lambda: cpus)
    cv = {"parallel": parallel, "cpus_per_fold": 1, "nested": nested}
    assert cv_task.parallel_folds(cv, {"address": address, "num_cpus": num_cpus}, folds) is expected


@pytest.mark.parametrize("where", ["ray", "pool"])
def test_parallel_folds_write_the_sequential_mlflow_tree(where, request, cfg_factory, tmp_path: Path, caplog):
    """Parallel folds (Ray tasks, or a local pool's workers where this process has no Ray and
    tune.address is null; either way unable to even import mlflow) leave the same results
    and the same MLflow tree as sequential ones: the driver writes every fold's run. On Ray
    they also run without the data folders, gone once the driver has read them (it hands the
    folds the data through Ray's object store), and still match the sequential folds, which
    read them; local workers read the folders themselves."""
    request.getfixturevalue(f"no_mlflow_{where}")
    # No system metrics: samples of this machine's load differ from run to run, and parallel
    # folds (which do not write to MLflow themselves) record none.
    base = cfg_factory([f"data.split.folds={FOLDS}", "model=mlp", "trainer.max_epochs=2",
                        "tracking.system_metrics=false"])
    ensure_data(base)
    results, trees = {}, {}
    for parallel in (False, True):
        cfg = sweeps.folds_mode(base, parallel, "cv-parallel")
        on_ray = parallel and where == "ray"
        hidden = sweeps.data_gone_once_loaded(cv_task, tmp_path / "data") if on_ray else contextlib.nullcontext([])
        caplog.clear()
        with hidden as loads, caplog.at_level("INFO", logger="pipeline.tasks.cv"):
            results[parallel] = cross_validate(cfg)
        assert len(loads) == on_ray  # on Ray, read once, by the driver
        # A line as each fold ends, in the order they end: the fold, how many, its scores.
        lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.tasks.cv"]
        assert sorted(int(line.split()[1]) for line in lines) == list(range(FOLDS)), lines
        assert [line.split("(")[1].split(",")[0] for line in lines] == [f"{n}/{FOLDS}" for n in range(1, FOLDS + 1)]
        assert all("val/acc=" in line and "test/acc=" in line for line in lines), lines
        trees[parallel] = _tree(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), cfg.tracking.experiment_name)
    assert results[True]["val/acc"]["values"] == results[False]["val/acc"]["values"]
    assert results[True]["test/acc"]["values"] == results[False]["test/acc"]["values"]
    # Parallel folds send their test probabilities back: the same ensemble without the folders.
    assert results[True]["ensemble/test/acc"] == results[False]["ensemble/test/acc"]
    assert "test_probs" not in json.dumps(results[True])

    if where == "pool":  # side by side: the second fold's run began before the first fold's ended
        # (the pool's workers are ready when the folds start; Ray may start its second worker
        # only when the second task comes, after a short fold has ended)
        (_, first_end), (second_start, _) = trees[True][1]["span"], trees[True][2]["span"]
        assert second_start < first_end
    for sequential, parallel in zip(trees[False], trees[True]):
        durations = {}
        for run, value in ((sequential, "False"), (parallel, "True")):
            assert run["params"].pop("cv.parallel") == value
            assert run["params"].pop("tracking.experiment_name") == f"cv-parallel-{value}"
            assert run["status"] == "FINISHED"
            start, end = run.pop("span")
            durations[value] = end - start
            run.pop("run_id")
        assert parallel == sequential
        # A fold's run keeps the times the worker trained at, not those of its writing.
        assert durations["True"] > 0.1 * durations["False"] > 0, durations
    fold_runs = trees[True][1:]
    assert {"config.yaml", "learning_curves.png", "train.json", "test.json", "confusion.png"} <= set(fold_runs[0]["artifacts"])
    assert [s for s, _ in fold_runs[0]["metrics"]["val/acc"]] == [0, 1]
    # The driver shares this machine with the folds: each fold's run.json names its run.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for fold in range(FOLDS):
        info = json.loads((tmp_path / "out" / "cv" / f"fold_{fold}" / "models" / "run.json").read_text())
        assert client.get_run(info["run_id"]).data.tags["fold"] == str(fold)
        assert client.get_run(info["run_id"]).info.experiment_id == \
            client.get_experiment_by_name("cv-parallel-True").experiment_id


def test_repeated_folds_train_every_repetition_with_its_labels(cfg_factory, tmp_path: Path):
    """cv.repeats=2 of 2 folds: four models, each validating on its own fold and training on
    the other fold of ITS repetition; runs, folders and cv.json say repetition and fold."""
    cfg = cfg_factory(["data.split.folds=2", "cv.repeats=2", "model=mlp", "trainer.max_epochs=1",
                       "tracking.run_name=rep"])
    ensure_data(cfg)
    result = cross_validate(cfg)
    assert (result["folds"], result["repeats"]) == (2, 2) and len(result["val/acc"]["values"]) == 4
    # Four scores from two repetitions are not four independent ones: the corrected interval,
    # variance factor 1/4 + 1/(2 - 1).
    acc = result["val/acc"]
    assert acc["variance_factor"] == 1.25
    half = stats.t.ppf(0.975, 3) * np.std(acc["values"], ddof=1) * np.sqrt(1.25)
    assert acc["ci_high"] - acc["mean"] == pytest.approx(half)
    splits = load_splits(tmp_path / "data" / "splits" / "digits")
    assert splits.repeats == 2 and len(splits.folds) == 4
    trainval = set(np.concatenate([splits.train, splits.val]).tolist())
    for rep in range(2):
        for i in range(2):
            idx = np.load(tmp_path / "out" / "cv" / f"rep_{rep}" / f"fold_{i}" / "models" / "indices.npz")
            assert set(idx["val"].tolist()) == set(splits.folds[rep * 2 + i].tolist())
            assert set(idx["train"].tolist()) == set(splits.folds[rep * 2 + 1 - i].tolist())
            assert set(idx["train"].tolist()) | set(idx["val"].tolist()) == trainval
    # The two repetitions dealt the folds differently.
    assert set(splits.folds[0].tolist()) != set(splits.folds[2].tolist())

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnn-pipeline").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert (parent.data.tags["cv_folds"], parent.data.tags["cv_repeats"]) == ("2", "2")
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: (r.data.tags["repetition"], r.data.tags["fold"]))
    assert [(r.data.tags["repetition"], r.data.tags["fold"], r.info.run_name) for r in children] == [
        ("0", "0", "rep-rep0-fold0"), ("0", "1", "rep-rep0-fold1"),
        ("1", "0", "rep-rep1-fold0"), ("1", "1", "rep-rep1-fold1")]
    np.testing.assert_allclose(result["val/acc"]["values"], [r.data.metrics["best/val/acc"] for r in children])


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_ends_the_local_fold_workers_and_the_runs(cfg_factory, tmp_path: Path, sig, status):
    """A real signal to the cv stage's process while its local pool's workers train: the
    workers are gone when it exits (130 or 143), the CV run ends KILLED, no fold run was
    written (the folds only recorded theirs) and no cv.json either."""
    cfg = cfg_factory([f"data.split.folds={FOLDS}", "model=mlp", "trainer.max_epochs=500", "cv.parallel=true",
                       "regularizer.early_stopping.enabled=false"])
    ensure_data(cfg)
    log = tmp_path / "stage.log"
    with log.open("w") as out:
        proc = start_stage("cv", cfg, tmp_path, out)
        try:
            wait_until(lambda: any((tmp_path / "out" / "cv").glob("fold_*/models/last.ckpt")), proc, log)  # an epoch
            children = psutil.Process(proc.pid).children()  # with multiprocessing's resource tracker
            workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
            assert len(workers) == 2, children  # two folds side by side, no Ray
            proc.send_signal(sig)
            assert proc.wait(timeout=120) == status, log.read_text()[-3000:]
        finally:
            proc.kill()
    def running(procs: list[psutil.Process]) -> list[psutil.Process]:
        def alive(p: psutil.Process) -> bool:
            try:
                return p.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False
        return [p for p in procs if alive(p)]

    assert not running(workers)  # the driver stopped them before it exited
    # multiprocessing's resource tracker exits by itself once the driver's end of its pipe
    # closed, a moment after the driver: CI once saw it still running at this point.
    deadline = time.monotonic() + 10
    while running(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(children)
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as con:
        runs = con.execute("SELECT name, status FROM runs").fetchall()
    assert [status for _, status in runs] == ["KILLED"], runs  # the CV run alone
    assert not (tmp_path / "out" / "metrics" / "cv.json").exists()


def test_a_local_worker_reads_the_data_once_for_all_its_folds(cfg_factory, monkeypatch):
    """A local pool's worker keeps the data it read for its first fold: the others (and a
    comparison's other alternatives on the same data) reuse it instead of reading the arrays
    and dvc.lock again; another residency (data.in_memory) is read anew."""
    cfg = cfg_factory([f"data.split.folds={FOLDS}", "model=mlp"])
    ensure_data(cfg)
    monkeypatch.setattr(cv_task, "_WORKER_DATA", {})
    reads = []
    real = cv_task.load_data
    monkeypatch.setattr(cv_task, "load_data", lambda *a, **k: reads.append(a) or real(*a, **k))
    plain = cv_task.to_container(cfg)
    first = cv_task._worker_data(plain)
    assert cv_task._worker_data({**plain, "model": {"name": "lenet5"}}) is first and len(reads) == 1
    mapped = cv_task._worker_data({**plain, "data": {**plain["data"], "in_memory": False}})
    assert mapped is not first and len(reads) == 2
