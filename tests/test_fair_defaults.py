"""Fair defaults (issue 14, point 3): designs compared at their intended input size, a warning
when an alternative was still improving at its last epoch, and a train stage that trains the
tuned values over the epoch budget they were tuned at (or says it does not)."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

import sweeps
from pipeline.config import compose
from pipeline.errors import ConfigError
from pipeline.tasks.compare import budget_warnings, compare
from pipeline.tasks.data import ensure_data
from pipeline.tasks.train import budget_mismatch
from pipeline.training.metrics import best_epoch
from pipeline.training.regularizers.early_stopping import still_improving
from pipeline.training.stopping import TieBreakingStop
from pipeline.validation import model_args, prepare

CONF = Path(__file__).resolve().parents[1] / "conf"


# ---------------------------------------------------------------- "still improving", by hand

@pytest.mark.parametrize("values,max_epochs,patience,min_delta,expected", [
    ([0.5, 0.6, 0.7], 3, 10, 0.0, True),            # best at the last epoch of the budget
    ([0.5, 0.6, 0.7], 5, 10, 0.0, False),           # ended before the budget: early stopping did it
    ([0.9, 0.5, 0.5, 0.5], 4, 3, 0.0, False),       # best 3 epochs before the end: stopped at the last
    ([0.5, 0.9, 0.5, 0.5], 4, 3, 0.0, True),        # best 2 epochs before the end: 1 more to wait
    ([0.5, 0.9, 0.9, 0.9], 4, 3, 0.0, True),        # a tie is no improvement: the first 0.9 counts
    ([0.5, 0.9, 0.9, 0.95], 4, 1, 0.1, False),      # +0.05 is within min_delta: last gain at epoch 1
    ([0.5, 0.9, 0.9, 1.01], 4, 1, 0.1, True),       # +0.11 beats min_delta at the last epoch
    ([0.5, 0.6], 2, 0, 0.0, True),                  # patience 0: the last epoch itself improved
    ([0.6, 0.5], 2, 0, 0.0, False),
    ([0.5, math.nan, 0.7], 3, 10, 0.0, False),      # a non-finite value: a diverged run
    ([], 1, 10, 0.0, False),
])
def test_still_improving_by_hand(values, max_epochs, patience, min_delta, expected):
    assert still_improving(values, max_epochs=max_epochs, patience=patience, min_delta=min_delta) is expected


def test_still_improving_for_a_loss():
    assert still_improving([1.0, 0.8, 0.6], max_epochs=3, patience=1, mode="min")
    assert not still_improving([0.6, 0.8, 0.9], max_epochs=3, patience=1, mode="min")


def _stops(values: list[float], ties: list[float] | None = None, *, patience: int, min_delta: float) -> int | None:
    """The epoch where the train stage's early stopping (Lightning's; an equal score with a
    lower validation loss, `ties`, counts as an improvement) stops a run recording `values`
    (None: it never does). Without `ties`, Lightning's own rule: the reference for
    `still_improving`."""
    stop = TieBreakingStop(monitor="val/acc", mode="max", patience=patience, min_delta=min_delta)
    for epoch, value in enumerate(values):
        stop._tie = None if ties is None else ties[epoch]
        if stop._evaluate_stopping_criteria(torch.tensor(value, dtype=torch.float64))[0]:
            return epoch
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=25), st.integers(0, 6), st.sampled_from([0.0, 0.02, 0.1]))
def test_still_improving_is_early_stopping_not_done_yet(ticks, patience, min_delta):
    # Accuracies on a coarse grid, as on a small validation fold (many ties); the budget is
    # len(values) epochs. A run is still improving exactly when early stopping on the
    # accuracy alone had not stopped it by the budget's last epoch.
    values = [t / 12 for t in ticks]
    stopped = _stops(values, patience=patience, min_delta=min_delta)
    run = values if stopped is None else values[:stopped + 1]
    assert still_improving(run, max_epochs=len(values), patience=patience, min_delta=min_delta) is (stopped is None)


def test_a_saturated_accuracy_trains_on_while_the_loss_falls():
    # Digits' 269-image validation split reaches 100% early; plain early stopping then ends
    # the run `patience` epochs later with an undertrained model (make run scored 0.981 on
    # test so). An equal accuracy with a lower validation loss is an improvement.
    acc = [0.9, 1.0, 1.0, 1.0, 1.0, 1.0]
    loss = [0.5, 0.30, 0.20, 0.10, 0.12, 0.13]
    assert _stops(acc, patience=2, min_delta=0.0) == 3           # accuracy alone: 2 epochs after epoch 1
    assert _stops(acc, loss, patience=2, min_delta=0.0) == 5     # the loss fell until epoch 3
    assert best_epoch(acc) == 1 and best_epoch(acc, loss) == 3
    assert best_epoch([0.5, 0.7, 0.6], [0.1, 0.9, 0.05]) == 1    # a higher score beats any loss
    assert best_epoch([]) == -1
    # A run the budget cut while only its loss fell is not "still improving": the accuracy
    # compared would not have changed.
    assert not still_improving(acc, max_epochs=6, patience=2)


def test_budget_warnings_name_each_alternative_still_improving():
    extra = {"mlp": {"still_improving": [], "epochs": [12, 15], "max_epochs": 40, "patience": 10, "early_stopping": True},
             "lenet5": {"still_improving": [0, 2], "epochs": [40, 31, 40], "max_epochs": 40, "patience": 10,
                        "early_stopping": True},
             "cnn": {"still_improving": [1], "epochs": [5, 5], "max_epochs": 5, "patience": 0, "early_stopping": False}}
    warnings = budget_warnings(extra)
    assert len(warnings) == 2
    assert warnings[0].startswith("lenet5 was still improving at its last epoch in 2 of 3 folds (0, 2): all 40 epochs")
    assert "within the last 10, so early stopping had not ended it" in warnings[0]
    assert "budget, not the design" in warnings[0] and "trainer.max_epochs" in warnings[0]
    assert warnings[1].startswith("cnn was still improving") and "within the last 1, (early stopping is off)" in warnings[1]


# ---------------------------------------------------------------- intended input size

def test_lenet5_is_resized_to_its_intended_input_by_default():
    cfg = prepare(compose(["model=lenet5"], conf=CONF))
    assert cfg.model.input_size == 32 and cfg.data.image_size == 8 and cfg.data.resize == 32
    args = model_args(cfg, num_classes=10)
    assert args["image_size"] == 32 and "input_size" not in args  # a design property, not a builder argument


@pytest.mark.parametrize("overrides,resize", [
    (["model=mlp"], None),                                  # no intended size: the data's own
    (["model=lenet5", "data.resize=16"], 16),               # an explicit resize wins
    (["model=lenet5", "model.input_size=null"], None),      # the raw 8x8 digits, on purpose
    (["model=lenet5", "data=cifar10"], None),               # already 32 px: nothing to resize
    (["experiment=lenet5_digits"], 32),
])
def test_intended_input_size_yields_to_explicit_choices(overrides, resize):
    assert prepare(compose(overrides, conf=CONF)).data.resize == resize


@pytest.mark.parametrize("value", ["0", "-3", "abc", "2.5", "true"])
def test_bad_input_size_names_the_key(value):
    with pytest.raises(ConfigError, match=r"model\.input_size"):
        prepare(compose(["model=lenet5", f"model.input_size={value}"], conf=CONF))


def test_prepare_twice_changes_nothing():
    once = prepare(compose(["model=lenet5"], conf=CONF))
    assert OmegaConf.to_container(prepare(once)) == OmegaConf.to_container(once)


# ---------------------------------------------------------------- the epoch budget of a sweep

def test_the_sweep_tunes_at_the_train_budget_by_default():
    assert compose([], conf=CONF).tune.max_epochs == compose([], conf=CONF).trainer.max_epochs == 40
    assert prepare(compose(["trainer.max_epochs=25"], conf=CONF)).tune.max_epochs == 25
    assert prepare(compose(["tune.max_epochs=8"], conf=CONF)).tune.max_epochs == 8  # still one's to choose


def test_budget_mismatch_says_how_the_schedule_is_stretched():
    cfg = prepare(compose(["scheduler=exponential", "scheduler.decay=0.1", "trainer.max_epochs=40"], conf=CONF))
    assert budget_mismatch(cfg, 40) is None
    text = budget_mismatch(cfg, 8)
    # exp(-0.1 * 7) = 0.497 at the trials' last epoch; exp(-0.1 * 39) = 0.0202 at this run's.
    assert "up to 40 epochs" in text and "among 8-epoch trials" in text
    assert "stretches the exponential learning-rate schedule tuned for a shorter run" in text
    assert "x0.497 of its start at the trials' last epoch, x0.0202 at this run's" in text
    assert "tune.max_epochs=40" in text and "trainer.max_epochs=8" in text and "tune.use_best=false" in text
    shorter = budget_mismatch(prepare(compose(["scheduler=cosine", "trainer.max_epochs=4"], conf=CONF)), 10)
    # cosine ends at its minimum in both (it is relative to the budget): 0.5 * (1 + cos(pi * 9 / 10)) = 0.0245.
    assert "cuts short the cosine learning-rate schedule" in shorter and "x0.0245" in shorter
    plateau = budget_mismatch(prepare(compose(["scheduler=plateau"], conf=CONF)), 8)
    assert "stretches the plateau learning-rate schedule tuned for a shorter run," in plateau


@pytest.mark.integration
@pytest.mark.slow
def test_train_stage_warns_when_it_stretches_a_tuned_schedule(local_ray, cfg_factory, tmp_path, caplog):
    """A real sweep (2 epochs: the train budget, which tune.max_epochs follows), then the
    train task from its best.yaml, at that budget and at a longer one."""
    from mlflow import MlflowClient

    from pipeline.tasks.train import train
    from pipeline.tasks.tune import tune

    base = ["model=mlp", "tune.num_cpus=2", "tune.num_samples=2", "tune.scheduler=fifo"]
    cfg = cfg_factory(base, epochs=2)
    ensure_data(cfg)
    tune(cfg)
    assert sweeps.best(tmp_path)["config"]["trainer"]["max_epochs"] == 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def run_tags() -> dict[str, str]:
        run_id = json.loads((tmp_path / "out/models/run.json").read_text())["run_id"]
        return client.get_run(run_id).data.tags

    with caplog.at_level(logging.WARNING, logger="pipeline"):
        train(cfg)
    assert not [r for r in caplog.records if r.name == "pipeline.tasks.train"]
    assert run_tags()["tuned_max_epochs"] == "2"

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        train(cfg_factory(base, epochs=3))
    warned = [r.getMessage() for r in caplog.records if r.name == "pipeline.tasks.train"]
    assert len(warned) == 1 and "up to 3 epochs" in warned[0] and "among 2-epoch trials" in warned[0]
    assert "stretches the exponential learning-rate schedule" in warned[0]
    assert yaml.safe_load((tmp_path / "out/models/config.yaml").read_text())["trainer"]["max_epochs"] == 3


# ---------------------------------------------------------------- a real comparison

@pytest.mark.integration
@pytest.mark.slow
def test_compare_trains_each_design_at_its_input_and_warns_on_the_budget(cfg_factory, tmp_path, caplog):
    # min_delta 1.0: only the first epoch counts as an improvement, so early stopping with
    # patience 1 ends every fold after 2 of 3 epochs, and patience 5 never does (still improving).
    cfg = cfg_factory(["data.split.folds=2", "regularizer.early_stopping.min_delta=1.0",
                       "compare.grid=[{model: [mlp, lenet5]}, {regularizer.early_stopping.patience: [1, 5]}]"], epochs=3)
    ensure_data(cfg)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        stats = compare(cfg)
    extra = stats["extra"]
    assert {n: e["input_px"] for n, e in extra.items()} == {
        "mlp,regularizer.early_stopping.patience=1": 8, "mlp,regularizer.early_stopping.patience=5": 8,
        "lenet5,regularizer.early_stopping.patience=1": 32, "lenet5,regularizer.early_stopping.patience=5": 32}
    for name, e in extra.items():
        patient = name.endswith("=5")
        assert e["epochs"] == ([3, 3] if patient else [2, 2]), name
        assert e["still_improving"] == ([0, 1] if patient else []), name
    warned = [r.getMessage() for r in caplog.records if r.name == "pipeline.tasks.compare"]
    assert sorted(w.split(" was ")[0] for w in warned) == sorted(n for n in extra if n.endswith("=5"))
    written = json.loads((tmp_path / "out/reports/compare.json").read_text())
    assert written["budget_warnings"] == warned and written["extra"] == extra
    report = (tmp_path / "out/reports/compare.md").read_text()
    assert report.count("- **Warning:** ") == 2
    assert re.search(r"\| lenet5,regularizer\.early_stopping\.patience=1 \| 32 \| 2 \(\d\), 2 \(\d\) \| 3 \| 2 of 2 \|", report)
    assert re.search(r"\| mlp,regularizer\.early_stopping\.patience=5 \| 8 \| 3 \(\d\), 3 \(\d\) \| 3 \| 0 of 2 \|", report)
