"""Accuracy against cost: the Pareto front against hand-worked cases and Optuna's own front,
`tune.objectives` checks, the latency timer, the compare task's cost figure, and real
multi-objective sweeps (Optuna's TPE and NSGA-II through Ray Tune, a local Ray, a SQLite
MLflow store) writing pareto.csv/png, best.yaml and the front on the MLflow parent."""

from __future__ import annotations

import csv
import logging
import math
import random
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import sweeps
from pipeline.analysis.stats import compare_alternatives
from pipeline.errors import ConfigError
from pipeline.models import create_model, measure_latency
from pipeline.tasks.compare import cost_fronts, cost_png, markdown
from pipeline.tuning.pareto import front_key, non_dominated, parse_objectives
from pipeline.tuning.plan import plan_sweep
from procs import BIN, project_env

NAN = math.nan


# ---------------------------------------------------------------------------- the front by hand

@pytest.mark.parametrize("points, modes, expected", [
    # Accuracy up, cost down. (0.9, 200) loses to (0.9, 100) on cost at equal accuracy; the
    # duplicate (0.95, 200) pair dominates neither the other: both stay.
    ([(0.9, 100), (0.95, 200), (0.9, 200), (0.8, 50), (0.95, 200)], ["max", "min"], [True, True, False, True, True]),
    # The same four corners under every direction: one corner dominates the rest each time.
    ([(1, 2), (2, 1), (2, 2), (1, 1)], ["min", "min"], [False, False, False, True]),
    ([(1, 2), (2, 1), (2, 2), (1, 1)], ["max", "max"], [False, False, True, False]),
    ([(1, 2), (2, 1), (2, 2), (1, 1)], ["max", "min"], [False, True, False, False]),
    ([(1, 2), (2, 1), (2, 2), (1, 1)], ["min", "max"], [True, False, False, False]),
    # A trade-off: neither of two dominates.
    ([(0.9, 10), (0.95, 20)], ["max", "min"], [True, True]),
    # Equal on one objective, better on the other: domination needs one strict improvement.
    ([(0.9, 10), (0.9, 10.5)], ["max", "min"], [True, False]),
    # All identical: all on the front.
    ([(1, 1)] * 3, ["max", "min"], [True, True, True]),
    # NaN: never on the front, dominates nothing (the (0.5, 2) point stays).
    ([(NAN, 0), (0.5, 2)], ["max", "min"], [False, True]),
    ([(0.99, NAN), (0.5, 2)], ["max", "min"], [False, True]),
    # Three objectives: (0.9, 10, 6) loses to (0.9, 10, 5) on the third only.
    ([(0.9, 10, 5), (0.9, 10, 6), (0.8, 5, 9)], ["max", "min", "min"], [True, False, True]),
    ([(3, 7)], ["max", "min"], [True]),
    ([], ["max", "min"], []),
])
def test_front_by_hand(points, modes, expected):
    assert non_dominated(points, modes) == expected


def test_front_agrees_with_optunas_on_random_points_with_ties():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(0)
    for modes in (["max", "min"], ["min", "min"], ["max", "min", "max"]):
        for _ in range(20):
            # Few distinct values: many ties and duplicates.
            points = [tuple(rng.randint(0, 4) for _ in modes) for _ in range(rng.randint(1, 12))]
            study = optuna.create_study(directions=["maximize" if m == "max" else "minimize" for m in modes])
            for p in points:
                study.add_trial(optuna.trial.create_trial(values=list(p)))
            reference = {t.number for t in study.best_trials}
            ours = {i for i, on in enumerate(non_dominated(points, modes)) if on}
            assert ours == reference, (points, modes)


def test_front_refuses_a_point_of_the_wrong_length():
    with pytest.raises(ValueError, match="has 3 objectives"):
        non_dominated([(1, 2), (1, 2, 3)], ["max", "min"])


def test_best_on_the_front_breaks_ties_by_the_next_objectives_then_val_loss():
    objectives = [("val/acc", "max"), ("model/macs", "min")]
    trials = [{"trial_id": "a", "objectives": {"val/acc": 0.98, "model/macs": 900.0}, "val/loss": 0.05},
              {"trial_id": "b", "objectives": {"val/acc": 0.98, "model/macs": 500.0}, "val/loss": 0.09},
              {"trial_id": "c", "objectives": {"val/acc": 0.98, "model/macs": 500.0}, "val/loss": 0.07},
              {"trial_id": "d", "objectives": {"val/acc": 0.90, "model/macs": 10.0}, "val/loss": NAN}]
    assert max(trials, key=lambda t: front_key(t, objectives))["trial_id"] == "c"


# ---------------------------------------------------------------------------- tune.objectives

def test_objectives_parse_in_order_in_either_form():
    listed = [{"val/acc": "max"}, {"model/macs": "min"}, {"model/latency_ms": "min"}]
    assert parse_objectives(listed) == [("val/acc", "max"), ("model/macs", "min"), ("model/latency_ms", "min")]
    assert parse_objectives({"val/loss": "min", "model/params": "min"}) == [("val/loss", "min"), ("model/params", "min")]
    assert parse_objectives(None) == [] and parse_objectives([]) == []


@pytest.mark.parametrize("objectives, message", [
    ("[{val/acc:max}]", r"one objective \(val/acc\): set tune\.metric and tune\.mode instead"),
    ("[{val/acc:max},{model/flops:min}]", r"unknown metric 'model/flops'; choose from .*model/macs"),
    ("[{val/acc:max},{model/macs:lowest}]", r"model/macs: 'lowest' must be max or min"),
    ("[{val/acc:max},{val/acc:min}]", r"lists val/acc twice"),
    ("[{model/macs:min},{val/acc:max}]", r"starts with model/macs: the first objective picks"),
    ("[{val/acc:max,model/macs:min}]", r"is not one \{metric: max\|min\}"),
    ("val/acc", r"tune\.objectives='val/acc': use a list of"),
])
def test_bad_objectives_fail_before_ray_starts(cfg_factory, objectives, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweep(cfg_factory([f"tune.objectives={objectives}"]))


@pytest.mark.parametrize("overrides, message", [
    (["tune.scheduler=pbt"], r"tune\.scheduler=pbt: PBT clones"),
    (["tune.cv=true"], r"tune\.cv=true: a cross-validated trial reports no model costs"),
    (["tune.workers=2"], r"tune\.workers > 1: a DDP trial reports no model costs"),
])
def test_what_cannot_rank_several_objectives_is_refused(cfg_factory, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweep(cfg_factory(["tune.objectives=[{val/acc:max},{model/macs:min}]", *overrides]))


def test_asha_falls_back_to_fifo_and_says_so(cfg_factory, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.tuning.pareto"):
        plan = plan_sweep(cfg_factory(["tune.scheduler=asha", "tune.objectives=[{val/loss:min},{model/params:min}]"]))
    assert plan.tune["scheduler"] == "fifo"
    assert "tune.scheduler=asha stops trials on one metric and cannot prune on 2 objectives" in caplog.text
    # The first objective is the sweep's metric: it picks each trial's epoch and best.yaml.
    assert (plan.tune["metric"], plan.tune["mode"]) == ("val/loss", "min")
    assert plan.objectives == [("val/loss", "min"), ("model/params", "min")]


@pytest.mark.parametrize("search_alg", ["optuna", "nsga2"])
def test_optuna_is_given_every_objective_and_tune_none(cfg_factory, search_alg):
    from pipeline.tuning.driver import _search

    plan = plan_sweep(cfg_factory(["tune=pareto", f"tune.search_alg={search_alg}"]))
    searcher, _ = _search(plan)
    assert (searcher.metric, searcher.mode) == (["val/acc", "model/macs"], ["max", "min"])


@pytest.mark.parametrize("search_alg", ["optuna", "nsga2"])
def test_the_search_algorithm_pickles_as_ray_keeps_it(cfg_factory, search_alg):
    """Ray pickles the searcher into tuner.pkl (cloudpickle) and each experiment checkpoint
    (`OptunaSearch.save`: plain pickle). Optuna 5.1's NSGA-II holds a lock that pickle refuses:
    the CI failure of a sweep before its first trial."""
    import pickle

    from ray import cloudpickle

    from pipeline.tuning.driver import _search

    plan = plan_sweep(cfg_factory(["tune=pareto", f"tune.search_alg={search_alg}"]))
    searcher, _ = _search(plan)
    for dumps in (cloudpickle.dumps, pickle.dumps):
        copy = pickle.loads(dumps(searcher))
        assert (copy.metric, copy.mode) == (searcher.metric, searcher.mode)
        sampler = copy._sampler
        assert type(sampler) is type(searcher._sampler)
        if hasattr(searcher._sampler, "_thread_lock"):  # Optuna >= 5.1: a lock of its own, usable
            assert sampler._thread_lock is not searcher._sampler._thread_lock
            with sampler._thread_lock:
                pass


def test_a_bad_objective_exits_2_from_the_command_line(tmp_path: Path):
    done = subprocess.run([str(BIN / "pipeline"), "tune", "tune.objectives=[{val/acc:max},{model/size:min}]",
                           f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/run"],
                          cwd=tmp_path, env=project_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "unknown metric 'model/size'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()
    assert not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------------------- latency

def test_latency_is_positive_restores_modes_and_leaves_the_random_state():
    model = create_model("minivgg", in_channels=1, num_classes=10, image_size=8)
    model.train()
    model.features[0].eval()  # a mixed state, restored as it was
    modes = [m.training for m in model.modules()]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    ms = measure_latency(model, (1, 8, 8), batch_size=4, warmup=1, repeats=3)
    assert ms > 0 and math.isfinite(ms)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.rand(3), expected_next)
    with pytest.raises(ValueError, match="repeats=0"):
        measure_latency(model, (1, 8, 8), repeats=0)


# ---------------------------------------------------------------------------- compare's cost figure

def _stats() -> dict:
    """Four alternatives: `big` is most accurate but costliest; `small` is cheapest; `mid`
    sits between; `waste` costs as much as `big` and scores less: dominated on both axes.
    `flat` has the parameters of `small` but more MACs and a higher mean. Three folds each,
    through the real comparison, every fold ended by early stopping."""
    means = {"small": 0.90, "mid": 0.95, "big": 0.98, "waste": 0.93, "flat": 0.96}
    costs = {"small": (1_000, 1_000), "mid": (10_000, 50_000), "big": (100_000, 900_000),
             "waste": (100_000, 900_000), "flat": (1_000, 60_000)}
    stats = compare_alternatives({n: [m - 0.01, m, m + 0.01] for n, m in means.items()}, n_train=200, n_test=100)
    budget = {"input_px": 8, "max_epochs": 40, "patience": 10, "early_stopping": True, "epochs": [20, 21, 22],
              "best_epoch": [9, 10, 11], "still_improving": []}
    stats["extra"] = {n: {"params": p, "macs": m, "time_s": 1.0, **budget} for n, (p, m) in costs.items()}
    return stats


def test_compare_marks_the_alternatives_no_other_beats_at_no_greater_cost(tmp_path: Path):
    stats = _stats()
    fronts = cost_fronts(stats["summaries"], stats["extra"], higher_is_better=True)
    # Against parameters, `flat` (1,000, 0.96) beats `small` and `mid`; against MACs it does not.
    assert fronts == {"params": ["big", "flat"], "macs": ["small", "mid", "big", "flat"]}
    # A loss (lower is better) turns the score axis around.
    assert cost_fronts(stats["summaries"], stats["extra"], higher_is_better=False) == {
        "params": ["small"], "macs": ["small"]}
    stats["cost_front"] = fronts
    figure = cost_png(stats, "val/acc", tmp_path / "compare_cost.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5000
    page = markdown(stats, "val/acc")
    assert "## Accuracy against cost" in page and "](compare_cost.png)" in page
    assert "against parameters big, flat; against MACs small, mid, big, flat." in page


# ---------------------------------------------------------------------------- real sweeps

def _check_sweep(tmp_path: Path, result: dict, objectives: list[tuple[str, str]], trials: int) -> list[dict]:
    out = tmp_path / "out" / "results" / "tune"
    with (out / "pareto.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == trials and {r["status"] for r in rows} == {"TERMINATED"}
    names = [m.replace("/", "_") for m, _ in objectives]
    assert list(rows[0])[-len(names) - 2:] == [*names, "on_front", "mlflow_run_id"]
    # on_front is the front of the written values; MACs are what the model costs.
    points = [[float(r[n]) for n in names] for r in rows]
    assert [r["on_front"] == "1" for r in rows] == non_dominated(points, [d for _, d in objectives])
    macs = {"mlp_narrow": 64 * 32 + 32 * 10, "mlp": 64 * 256 + 256 * 128 + 128 * 10}
    for r in rows:
        assert float(r["model_macs"]) == macs[r["model"]]
        assert 0 < float(r["val_acc"]) <= 1
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # best.yaml: the front member best on the first objective.
    best = yaml.safe_load((out / "best.yaml").read_text())
    front = [r for r in rows if r["on_front"] == "1"]
    assert best["trial_id"] in {r["trial_id"] for r in front} and best["pareto_front"] == [r["trial_id"] for r in front]
    assert float(best["objectives"]["val/acc"]) == max(float(r["val_acc"]) for r in front)
    assert best["trial_id"] == result["trial_id"]
    # The MLflow parent holds the front; each child its costs and whether it is on the front.
    client, parent, children = sweeps.tree(tmp_path)
    assert parent.data.tags["pareto_front"] == ",".join(r["trial_id"] for r in front)
    assert parent.data.tags["objectives"] == ", ".join(f"{m}:{d}" for m, d in objectives)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.csv", "pareto.png", "pareto_front.json", "best.yaml"} <= logged
    table = client.download_artifacts(parent.info.run_id, "pareto_front.json", str(tmp_path))
    assert [row[0] for row in yaml.safe_load(Path(table).read_text())["data"]] == [r["trial_id"] for r in front]
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    for r in rows:
        child = by_trial[r["trial_id"]]
        assert child.data.tags["on_front"] == ("true" if r["on_front"] == "1" else "false")
        assert child.data.metrics["model/macs"] == float(r["model_macs"])
    return rows


@pytest.mark.integration
@pytest.mark.slow
def test_pareto_sweep_with_optuna_tpe(local_ray, digits_cfg, cfg_factory, tmp_path: Path):
    from pipeline.tasks.tune import tune

    objectives = [("val/acc", "max"), ("model/macs", "min"), ("model/latency_ms", "min")]
    cfg = cfg_factory(["tune=pareto", "tune.num_samples=3", "tune.max_epochs=1", "tune.max_concurrent_trials=2",
                       "tune.objectives=[{val/acc:max},{model/macs:min},{model/latency_ms:min}]",
                       *sweeps.space(model="choice[mlp_narrow, mlp]", **{"optimizer.lr": "loguniform(1e-3, 1e-2)"})])
    result = tune(cfg)
    rows = _check_sweep(tmp_path, result, objectives, 3)
    assert all(float(r["model_latency_ms"]) > 0 for r in rows)
    _, parent, _ = sweeps.tree(tmp_path)
    assert parent.data.tags["search_alg"] == "optuna" and parent.data.tags["tune_scheduler"] == "fifo"


@pytest.mark.integration
@pytest.mark.slow
def test_pareto_sweep_with_nsga2_after_asha_falls_back(local_ray, digits_cfg, cfg_factory, tmp_path: Path):
    from pipeline.tasks.tune import tune

    objectives = [("val/acc", "max"), ("model/macs", "min")]
    cfg = cfg_factory(["tune.search_alg=nsga2", "tune.scheduler=asha", "tune.asha.grace_period=1",
                       "tune.num_samples=4", "tune.max_epochs=1", "tune.max_concurrent_trials=2",
                       "tune.objectives=[{val/acc:max},{model/macs:min}]",
                       *sweeps.space(model="choice[mlp_narrow, mlp]")])
    result = tune(cfg)
    rows = _check_sweep(tmp_path, result, objectives, 4)
    assert "model_latency_ms" not in rows[0]  # timed only when it is an objective
    _, parent, _ = sweeps.tree(tmp_path)
    assert parent.data.tags["search_alg"] == "nsga2" and parent.data.tags["tune_scheduler"] == "fifo"
    # The train stage starts from the chosen front member (tune.use_best).
    from pipeline.tuning.best import apply_best

    applied, tags = apply_best(OmegaConf.create(OmegaConf.to_container(cfg)))
    assert tags["tuned_trial"] == result["trial_id"]
    assert applied.model.hidden_sizes == ([32] if result["overrides"]["model"] == "mlp_narrow" else [256, 128])


@pytest.mark.integration
@pytest.mark.slow
def test_compare_writes_the_cost_figure_and_marks_its_front(cfg_factory, tmp_path: Path):
    import json

    from pipeline.tasks.compare import compare
    from pipeline.tasks.data import ensure_data

    cfg = cfg_factory(["data.split.folds=2", "trainer.max_epochs=1", "tracking.enabled=false",
                       "compare.grid=[{model: [mlp_narrow, mlp]}]"])
    ensure_data(cfg)
    stats = compare(cfg)
    reports = tmp_path / "out" / "reports"
    assert (reports / "compare_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((reports / "compare.json").read_text())
    # The marks are the front of the written means and costs; the narrow MLP, cheaper on
    # both counts, is always on it.
    assert saved["cost_front"] == cost_fronts(saved["summaries"], saved["extra"], higher_is_better=True)
    assert "mlp_narrow" in saved["cost_front"]["params"] and "mlp_narrow" in saved["cost_front"]["macs"]
    assert saved["extra"]["mlp_narrow"]["macs"] == 64 * 32 + 32 * 10 < saved["extra"]["mlp"]["macs"]
    assert "](compare_cost.png)" in (reports / "compare.md").read_text() and stats["cost_front"] == saved["cost_front"]
