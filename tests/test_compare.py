"""Comparing designs end to end: a planted worse design is found, identical ones are not."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

import sweeps
from pipeline.analysis.stats import TESTS
from pipeline.cli.main import main
from pipeline.tasks.compare import alternatives, compare
from pipeline.tasks.data import ensure_data
from pipeline.validation import COMPARE_TESTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_alternatives_grid_order():
    assert alternatives({"model": ["mlp", "lenet5"], "regularizer": ["none", "dropout"]}) == [
        {"model": "mlp", "regularizer": "none"}, {"model": "mlp", "regularizer": "dropout"},
        {"model": "lenet5", "regularizer": "none"}, {"model": "lenet5", "regularizer": "dropout"}]


def test_planted_worse_and_identical_designs(cfg_factory, tmp_path):
    # Three designs on the same folds: a 1-unit MLP (clearly worse) and two MLPs that differ
    # only in evaluation batch size (identical models, identical scores).
    cfg = cfg_factory(["model=mlp", "data.split.folds=3", "trainer.max_epochs=4",
                       "compare.grid=[{model.hidden_sizes: [[1], [64]]}, {data.eval_batch_size: [256, 512]}]"])
    ensure_data(cfg)
    stats = compare(cfg)
    names = list(stats["summaries"])
    assert len(names) == 4
    weak = [n for n in names if "[1]" in n]
    strong = [n for n in names if "[64]" in n]
    pairs = {(p["a"], p["b"]): p for p in stats["pairs"]}
    same = pairs[tuple(strong)]
    assert not same["significant"] and same["mean_diff"] == 0
    worse = pairs[(weak[0], strong[0])]
    assert worse["significant"] and worse["worse"] == weak[0]
    assert any("not significantly different" in s for s in stats["statements"])
    report = (tmp_path / "out" / "reports" / "compare.md").read_text()
    assert "| alternative | mean ± std" in report and weak[0] in report
    # Each alternative's fold ensemble beside its mean single-fold test accuracy, from cv.json.
    assert "| test acc: mean single fold | test acc: fold ensemble |" in report
    for name in names:
        e = stats["extra"][name]
        assert 0 <= e["single_test_acc"] <= 1 and 0 <= e["ensemble_test_acc"] <= 1
        assert f"| {e['single_test_acc']:.4f} | {e['ensemble_test_acc']:.4f} |" in report
    cv_files = sorted((tmp_path / "out" / "compare").glob("*/metrics/cv.json"))
    assert sorted(json.loads(p.read_text())["ensemble_test_acc"] for p in cv_files) == \
        sorted(stats["extra"][n]["ensemble_test_acc"] for n in names)
    # The corrected t-test decides by default; the report says so, and why, in one sentence.
    assert stats["test"] == "corrected_t" and all(p["significant"] == p["corrected_t"]["reject"] for p in stats["pairs"])
    assert ("Decided by the corrected resampled t-test: the folds' training sets overlap, so their score "
            "differences are correlated and the plain paired t-test is too eager") in report
    assert "corrected t p (Holm) — decides | paired t p (Holm) | Wilcoxon p (Holm) | McNemar p (Holm)" in report
    # n_test / n_train is a fold's validation share: about 1/2 with 3 folds.
    assert stats["n_test"] / stats["n_train"] == pytest.approx(0.5, rel=0.01)
    assert (tmp_path / "out" / "reports" / "compare_folds.png").stat().st_size > 1000
    # Each design's mean on the comparison's MLflow run.
    from mlflow import MlflowClient

    from pipeline.tasks.compare import design_metric

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id],
                               "tags.compare = 'true'")
    assert {design_metric(n, cfg.compare.metric): stats["summaries"][n]["mean"] for n in names} == \
        {k: v for k, v in run.data.metrics.items() if k.startswith("design/")}
    # Reproducible: the same seed gives the same numbers.
    again = compare(cfg)
    assert json.dumps(again["summaries"]) == json.dumps(stats["summaries"])


def test_parallel_folds_of_every_alternative_run_as_one_batch(cfg_factory, tmp_path):
    """With parallel folds a comparison queues every alternative's folds at once (no core
    waits at the end of each alternative): their CV runs are open together, and the scores
    and the MLflow tree (comparison, a CV run per alternative, a run per fold) are those of a
    comparison that runs its alternatives one after another."""
    from mlflow import MlflowClient

    base = cfg_factory(["model=mlp", "data.split.folds=2", "trainer.max_epochs=2", "tracking.system_metrics=false",
                        "compare.grid=[{model.hidden_sizes: [[8], [32]]}]"])
    ensure_data(base)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    stats, spans = {}, {}
    for parallel in (False, True):
        cfg = sweeps.folds_mode(base, parallel, "compare-parallel")
        stats[parallel] = compare(cfg)
        runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id])
        assert all(r.info.status == "FINISHED" for r in runs)
        [top] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        cvs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == top.info.run_id]
        folds = {cv.info.run_name: sorted(r.data.tags["fold"] for r in runs
                                          if r.data.tags.get("mlflow.parentRunId") == cv.info.run_id) for cv in cvs}
        assert folds == {name: ["0", "1"] for name in stats[parallel]["summaries"]}
        spans[parallel] = sorted((cv.info.start_time, cv.info.end_time) for cv in cvs)
        assert all(e["time_s"] > 0 for e in stats[parallel]["extra"].values())
    assert json.dumps(stats[True]["summaries"]) == json.dumps(stats[False]["summaries"])
    assert spans[False][1][0] >= spans[False][0][1]  # one alternative after the other
    assert spans[True][1][0] < spans[True][0][1]  # side by side


def test_five_by_two_on_five_repetitions_of_two_folds(cfg_factory, tmp_path):
    cfg = cfg_factory(["model=mlp", "data.split.folds=2", "cv.repeats=5", "compare.test=five_by_two",
                       "trainer.max_epochs=1", "tracking.enabled=false",
                       "compare.grid=[{model.hidden_sizes: [[2], [64]]}]"])
    ensure_data(cfg)
    stats = compare(cfg)
    assert (stats["test"], stats["folds"], stats["repeats"], stats["n_folds"]) == ("five_by_two", 2, 5, 10)
    pair = stats["pairs"][0]
    assert pair["significant"] == pair["five_by_two"]["reject"] and pair["five_by_two"]["df"] == 5
    assert pair["corrected_t"]["df"] == 9  # k * r - 1
    report = (tmp_path / "out" / "reports" / "compare.md").read_text()
    assert "(2 folds x 5 repetitions, alpha 0.05" in report
    assert "Decided by the 5x2cv paired t-test: chosen by compare.test=five_by_two" in report
    assert "5x2cv t p (Holm) — decides | corrected t p (Holm)" in report


def _refused(tmp_path, *overrides: str) -> tuple[int, str, list[str]]:
    """`pipeline compare <overrides>` in this process, in an empty project: status, stderr, leftovers."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    err, cwd = io.StringIO(), os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = main(["compare", "trainer.max_epochs=1", *overrides])
            except SystemExit as stop:
                status = stop.code
    finally:
        os.chdir(cwd)
    return status, err.getvalue(), sorted(p.name for p in tmp_path.iterdir() if p.name != "dvc.yaml")


def test_five_by_two_needs_five_repetitions_of_two_folds(tmp_path):
    status, err, left = _refused(tmp_path, "compare.test=five_by_two")
    assert status == 2 and "Traceback" not in err and left == []
    assert "compare.test=five_by_two" in err and "data.split.folds=2 cv.repeats=5" in err
    assert "got data.split.folds=5 and cv.repeats=1" in err


@pytest.mark.parametrize("override, key", [("compare.test=t_test", "compare.test"), ("cv.repeats=0", "cv.repeats"),
                                           ("cv.repeats=1.5", "cv.repeats")])
def test_bad_test_or_repeats_refused(tmp_path, override, key):
    status, err, left = _refused(tmp_path, override)
    assert status == 2 and key in err and "Traceback" not in err and left == []


def test_config_test_names_are_the_stats_tests():
    assert set(COMPARE_TESTS) == set(TESTS)
