"""Search algorithms and trial schedulers beyond random search with ASHA, end to end on a real
local Ray and a SQLite MLflow store: Population Based Training (perturbs the learning rate and
dropout and clones checkpoints between trials), Optuna's TPE over a group choice, HyperBand
over a grid (its synchronous rungs pause trials and resume them from their checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sweeps
from pipeline.tasks.data import ensure_data
from pipeline.tasks.tune import tune

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MLP = ["model=mlp", "tune.num_cpus=2", "tune.metric=val/acc", "tune.mode=max"]  # ranked by accuracy


def _trial_configs(experiment: str) -> dict[str, dict]:
    """{trial id: the config its train task last ran with (its folder's models/config.yaml)}."""
    import yaml

    configs = {}
    for result in Path(experiment).glob("*/result.json"):
        last = json.loads(result.read_text().splitlines()[-1])
        configs[last["trial_id"]] = yaml.safe_load((result.parent / "models" / "config.yaml").read_text())
    return configs


def test_pbt_perturbs_lr_and_dropout_and_trains_with_the_new_values(local_ray, cfg_factory, tmp_path: Path):
    # No lr schedule, so the rate a trial trains with each epoch is its config's optimizer.lr.
    cfg = cfg_factory([*MLP, "tune.scheduler=pbt", "tune.num_samples=4", "tune.max_epochs=6",
                       "tune.resources.cpu=0.5", "tune.max_concurrent_trials=4", "tune.fixed.scheduler=none",
                       "tune.pbt.perturbation_interval=2", "tune.pbt.quantile_fraction=0.5",
                       *sweeps.space(**{"optimizer.lr": "loguniform(1e-4, 1e-1)",
                                        "regularizer.dropout": "uniform(0.0, 0.5)"})])
    ensure_data(cfg)
    result = tune(cfg)

    rows = sweeps.trials(tmp_path)
    assert len(rows) == 4 and {t["status"] for t in rows} == {"TERMINATED"}
    experiment = Path(result["experiment"])
    exploits = [json.loads(line) for line in (experiment / "pbt_global.txt").read_text().splitlines()]
    assert exploits, "PBT cloned no trial"
    # Each trial ends at its last epoch: no exploit there, so no epoch is trained twice at the end.
    for path in experiment.glob("*/result.json"):
        iterations = [json.loads(line)["training_iteration"] for line in path.read_text().splitlines()]
        assert iterations[-1] == 6 and iterations.count(6) == 1, (path.parent.name, iterations)

    client, parent, children = sweeps.tree(tmp_path)
    assert len(children) == 4 and parent.data.params["tune.scheduler"] == "pbt"
    perturbed = 0
    for child in children:
        run_id, trial_id = child.info.run_id, child.data.tags["trial_id"]
        # A cloned trial goes on from the donor's epoch, so a step can repeat or be skipped.
        logged = sweeps.steps(client, run_id)
        assert logged[-1] == 5 and set(logged) <= set(range(6)), (trial_id, logged)
        lrs, used = sweeps.history(client, run_id, "hp/optimizer.lr"), sweeps.history(client, run_id, "lr")
        assert sorted(lrs) == sorted(used) == sorted(set(logged))
        # The rate each epoch trained with is the one its config had for that epoch, also
        # after the trial took over another trial's checkpoint (and its optimizer state).
        for epoch, lr in lrs.items():
            assert used[epoch] == pytest.approx(lr, rel=1e-5), (trial_id, epoch)
        perturbed += len(set(lrs.values())) > 1
    assert perturbed >= 1, "no trial's learning rate changed"
    # A restarted trial trains with its new dropout too: its last config is the trial's final one.
    configs = _trial_configs(result["experiment"])
    final = {c.data.tags["trial_id"]: sweeps.history(client, c.info.run_id, "hp/regularizer.dropout")[5]
             for c in children}
    for trial_id, config in configs.items():
        assert config["regularizer"]["dropout"] == pytest.approx(final[trial_id], rel=1e-5)
    assert sweeps.best(tmp_path)["trial_id"] == result["trial_id"]


def test_optuna_tpe_samples_group_choices_reproducibly(local_ray, cfg_factory, tmp_path: Path):
    overrides = [*MLP, "tune.search_alg=optuna", "tune.scheduler=fifo", "tune.num_samples=4", "tune.max_epochs=2",
                 "tune.max_concurrent_trials=2", "tune.fixed.scheduler=none",
                 *sweeps.space(**{"optimizer": "choice[sgd, adam]", "optimizer.lr": "loguniform(1e-3, 1e-1)"})]
    cfg = cfg_factory(overrides)
    ensure_data(cfg)
    result = tune(cfg)

    rows = sweeps.trials(tmp_path)
    assert len(rows) == 4 and {t["status"] for t in rows} == {"TERMINATED"}
    client, parent, children = sweeps.tree(tmp_path)
    assert parent.data.tags["search_alg"] == "optuna" and len(children) == 4
    configs = _trial_configs(result["experiment"])
    for t in rows:  # each trial trained the optimizer option and rate it was given
        config = configs[t["trial_id"]]
        assert config["optimizer"]["name"] == t["optimizer"]
        assert config["optimizer"]["lr"] == pytest.approx(float(t["optimizer.lr"]))
        assert 1e-3 <= float(t["optimizer.lr"]) <= 1e-1
    # Seeded: a second sweep with the same seed proposes the same trials.
    first = sorted((t["optimizer"], t["optimizer.lr"]) for t in rows)
    tune(cfg_factory([*overrides, "tune.name=again"]))
    assert sorted((t["optimizer"], t["optimizer.lr"]) for t in sweeps.trials(tmp_path)) == first


# HyperBand stops paused trials at its milestones; when such a trial's actor was already gone
# (more often under load), Ray 2.60 saved it as PAUSED though it ended: trials.csv must say
# TERMINATED (results.collect's all_ended).
def test_hyperband_over_a_grid_tries_every_value_once(local_ray, cfg_factory, tmp_path: Path):
    grid = [0.0003, 0.001, 0.003, 0.01, 0.03, 0.1]  # 6: HyperBand's second bracket stops one early
    cfg = cfg_factory([*MLP, "tune.search_alg=grid", "tune.scheduler=hyperband", "tune.max_epochs=4",
                       "tune.max_concurrent_trials=null", "tune.hyperband.reduction_factor=2",
                       *sweeps.space(**{"optimizer.lr": f"grid[{', '.join(map(str, grid))}]"})])
    ensure_data(cfg)
    result = tune(cfg)

    rows = sweeps.trials(tmp_path)
    assert sorted(float(t["optimizer.lr"]) for t in rows) == grid
    assert {t["status"] for t in rows} == {"TERMINATED"}
    epochs = {t["trial_id"]: int(t["epochs"]) for t in rows}
    assert max(epochs.values()) == 4 and min(epochs.values()) < 4, epochs  # HyperBand stopped some early
    client, parent, children = sweeps.tree(tmp_path)
    assert parent.data.params["tune.scheduler"] == "hyperband"
    for child in children:  # paused and resumed trials log every epoch once
        assert sweeps.steps(client, child.info.run_id) == list(range(epochs[child.data.tags["trial_id"]]))
    assert result["value"] == max(float(t["best_val_acc"]) for t in rows)
