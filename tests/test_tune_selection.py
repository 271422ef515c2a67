"""Honest selection among a sweep's trials (`pipeline.tuning.selection`): the exact McNemar
test against values worked by hand and scipy's binomial test, the indistinguishable set and
its tie-break on hand-made trials, the saturation warning, the packed correctness vectors a
trial reports, and a real Ray Tune sweep whose best.yaml, trials.csv and MLflow parent carry
the selection (its p-values recomputed here from the trials' own reports)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

import sweeps
from pipeline.errors import ConfigError
from pipeline.tuning.plan import plan_sweep
from pipeline.tuning.results import choose_best
from pipeline.tuning.selection import CORRECT_KEY, Candidate, mcnemar_exact, pack, select, unpack


def vector(n: int, wrong: list[int]) -> np.ndarray:
    out = np.ones(n, dtype=bool)
    out[wrong] = False
    return out


# ---------------------------------------------------------------------------- McNemar, exact

@pytest.mark.parametrize("only_a, only_b, expected", [
    (0, 0, 1.0),          # no disagreement at all
    (6, 0, 2 * 0.5**6),   # 0.03125: six samples only the first gets right
    (5, 0, 2 * 0.5**5),   # 0.0625: five are not enough at 0.05
    (3, 1, 2 * (1 + 4) / 16),       # 2 P(X <= 1), X ~ Bin(4, 1/2) = 0.625
    (1, 3, 2 * (1 + 4) / 16),       # symmetric
    (2, 2, 1.0),          # 2 P(X <= 2) = 22/16, capped at 1
    (7, 2, 2 * (1 + 9 + 36) / 512),  # 2 P(X <= 2), X ~ Bin(9, 1/2) = 0.1796875
])
def test_mcnemar_exact_by_hand(only_a, only_b, expected):
    both = 40  # samples both get right, and 3 both get wrong: they do not enter the test
    a = np.array([True] * only_a + [False] * only_b + [True] * both + [False] * 3)
    b = np.array([False] * only_a + [True] * only_b + [True] * both + [False] * 3)
    assert mcnemar_exact(a, b) == pytest.approx(expected, abs=1e-12)
    assert mcnemar_exact(b, a) == pytest.approx(expected, abs=1e-12)


def test_mcnemar_exact_matches_scipys_binomial_test():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 300))
        a, b = rng.random(n) < rng.random(), rng.random(n) < rng.random()
        only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
        reference = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
        assert mcnemar_exact(a, b) == pytest.approx(reference, rel=1e-9, abs=1e-12)


def test_mcnemar_exact_stays_exact_on_large_validation_sets():
    """The tail is summed in integers: far past the doubles 2**-n underflows (n > 1074), and
    still matching scipy where the p-value is representable."""
    for only_a, only_b in [(1500, 1400), (30_000, 29_000), (3, 2_000), (10, 10)]:
        a = np.array([True] * only_a + [False] * only_b)
        reference = binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert mcnemar_exact(a, ~a) == pytest.approx(reference, rel=1e-9, abs=1e-300)
        assert mcnemar_exact(~a, a) == mcnemar_exact(a, ~a)


def test_mcnemar_refuses_unpaired_vectors():
    with pytest.raises(ValueError, match="differ in length: 3 and 4"):
        mcnemar_exact(np.ones(3, bool), np.ones(4, bool))


# ---------------------------------------------------------------------------- packed vectors

@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 269, 5000])
def test_pack_round_trips(n):
    bits = np.random.default_rng(n).random(n) < 0.7
    text = pack(bits)
    assert text.startswith(f"{n}:")
    assert np.array_equal(unpack(text), bits) and unpack(text).dtype == bool


@pytest.mark.parametrize("text", [None, 1.0, "", "269", "x:AAAA", "9:AA==", "-1:", "3:not base64!"])
def test_unpack_refuses_what_is_not_a_packed_vector(text):
    assert unpack(text) is None  # "9:AA==" holds 8 bits, not 9


# ---------------------------------------------------------------------------- select

N = 20
TRIALS = [  # value = the vector's mean, as a trial's val/acc is
    Candidate("t0", 1.0, 0.05, vector(N, [])),
    Candidate("t1", 1.0, 0.02, vector(N, [])),
    Candidate("t2", 0.9, 0.01, vector(N, [3, 7])),             # 2 errors: p = 2 / 4 = 0.5
    Candidate("t3", 0.7, 0.001, vector(N, [0, 1, 2, 3, 4, 5])),  # 6 errors: p = 2 / 64
]


def test_indistinguishable_trials_break_the_tie_on_validation_loss():
    s = select(TRIALS, metric="val/acc", mode="max", alpha=0.05)
    # The top by val/acc: t0 and t1 share 1.0; the exact tie goes to the lower val/loss.
    assert s.top == "t1" and s.test == "mcnemar_exact" and s.n_val == N
    assert s.p_values == pytest.approx({"t0": 1.0, "t1": 1.0, "t2": 0.5, "t3": 0.03125})
    # t3 is distinguishable (p < 0.05) however low its loss; the rest are ordered by loss.
    assert s.indistinguishable == ("t2", "t1", "t0")
    assert s.chosen == "t2"
    assert "0 error(s) in 20 validation samples" in s.saturated and "2 trials share the best val/acc" in s.saturated


def test_alpha_decides_who_is_tied():
    s = select(TRIALS, metric="val/acc", mode="max", alpha=0.6)  # t2's p = 0.5 is now a difference
    assert s.indistinguishable == ("t1", "t0") and s.chosen == "t1"
    s = select(TRIALS, metric="val/acc", mode="max", alpha=0.01)  # t3's p = 0.031 is no longer one
    assert s.indistinguishable == ("t3", "t2", "t1", "t0") and s.chosen == "t3"


def test_tie_break_none_keeps_the_top_trial_but_still_records_the_ties():
    s = select(TRIALS, metric="val/acc", mode="max", tie_break="none")
    assert s.chosen == s.top == "t1" and s.indistinguishable == ("t2", "t1", "t0")


def test_without_vectors_only_exact_ties_are_ties():
    """tune.cv (the k-fold mean; no vectors): t0 and t1 tie exactly, t2 is not testable."""
    bare = [Candidate(c.trial_id, c.value, c.loss) for c in TRIALS]
    s = select(bare, metric="val/acc", mode="max")
    assert s.test == "none" and s.n_val is None
    assert s.p_values == {"t0": None, "t1": 1.0, "t2": None, "t3": None}  # t0: tied, not tested
    assert s.indistinguishable == ("t1", "t0") and s.chosen == "t1"
    assert s.saturated == "2 trials share the best val/acc 1"


def test_a_trial_without_a_comparable_vector_is_not_tested():
    trials = [*TRIALS[:3], Candidate("t9", 0.95, 0.0001, vector(N + 1, [0]))]  # another split's length
    s = select(trials, metric="val/acc", mode="max")
    assert s.p_values["t9"] is None and "t9" not in s.indistinguishable and s.chosen == "t2"


def test_ranking_by_loss_picks_the_lowest_and_records_who_is_as_accurate():
    """mode min on val/loss: the top trial is the pick; McNemar on the accuracies says that
    t2 is as accurate (t2 misses 3 and 7, t3 misses 0-5: only t3 gets sample 7, only t2
    gets 0, 1, 2, 4, 5: p = 2 P(X <= 1 | 6) = 14/64), t0 and t1 are not (they alone get
    0-5: p = 2 / 64); val/loss does not saturate."""
    s = select(TRIALS, metric="val/loss", mode="min")
    assert s.top == s.chosen == "t3" and s.test == "mcnemar_exact"
    assert s.p_values == pytest.approx({"t0": 0.03125, "t1": 0.03125, "t2": 2 * (1 + 6) / 64, "t3": 1.0})
    assert s.indistinguishable == ("t3", "t2") and s.saturated == ""


def test_missing_loss_sorts_last_and_one_trial_is_its_own_pick():
    trials = [Candidate("a", 1.0, math.nan, vector(N, [])), Candidate("b", 1.0, 0.3, vector(N, []))]
    assert select(trials, metric="val/acc", mode="max").chosen == "b"
    alone = select([Candidate("a", 0.8, 0.4, vector(N, [0, 1, 2, 3]))], metric="val/acc", mode="max")
    assert (alone.chosen, alone.top, alone.indistinguishable, alone.saturated) == ("a", "a", ("a",), "")


@pytest.mark.parametrize("wrong, saturated", [(0, True), (1, True), (2, False)])
def test_saturation_is_within_one_sample_of_perfect(wrong, saturated):
    best = Candidate("a", (N - wrong) / N, 0.1, vector(N, list(range(wrong))))
    worse = Candidate("b", (N - 5) / N, 0.2, vector(N, list(range(5))))
    s = select([best, worse], metric="val/acc", mode="max")
    assert bool(s.saturated) is saturated
    if saturated:
        assert f"{wrong} error(s) in {N} validation samples" in s.saturated


def test_choose_best_warns_when_the_metric_saturates(caplog):
    tune = {"metric": "val/acc", "mode": "max", "selection": {"alpha": 0.05, "tie_break": "val/loss"}}
    summaries = [{"trial_id": c.trial_id, "value": c.value, "val/loss": c.loss, "correct": c.correct} for c in TRIALS]
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        best, selection = choose_best(tune, summaries)
    assert best["trial_id"] == selection.chosen == "t2"
    [record] = [r for r in caplog.records if r.name == "pipeline.tuning.results"]
    assert record.levelno == logging.WARNING
    assert "val/acc saturates on this validation split" in record.getMessage()
    assert "picked t2 among them by the lowest val/loss" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline"):  # t2 and t3 alone: tied (p = 14/64), not saturated
        best, _ = choose_best(tune, summaries[2:])
    assert best["trial_id"] == "t3" and [r.getMessage() for r in caplog.records] == [
        "1 other trial(s) are statistically indistinguishable from the top trial t2 by val/acc (exact McNemar "
        "test, alpha 0.05, 20 validation samples); picked t3 among them by the lowest val/loss."]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline"):  # t0 and t1 share 1.0: t1, lower loss, is top and pick
        best, _ = choose_best(tune, summaries[:2])
    assert best["trial_id"] == "t1" and caplog.records[0].getMessage().endswith(
        "1 other trial(s) are statistically indistinguishable from the top trial t1 by val/acc (exact McNemar test, "
        "alpha 0.05, 20 validation samples); kept it: it also has the lowest val/loss among them. A k-fold mean "
        "(tune.cv=true) or a larger validation split ranks them on more samples.")
    caplog.clear()
    winner = {"trial_id": "a", "value": 0.9, "val/loss": 0.3, "correct": vector(N, [0, 1])}
    loser = {"trial_id": "b", "value": 0.5, "val/loss": 0.1, "correct": vector(N, list(range(10)))}  # p = 2 / 256
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        best, _ = choose_best(tune, [winner, loser])
    assert best["trial_id"] == "a" and not caplog.records  # a measured winner: nothing to warn about


@pytest.mark.parametrize("override, message", [
    ("tune.selection.alpha=0", r"tune\.selection\.alpha=0 is out of range: it must be > 0 and < 1"),
    ("tune.selection.alpha=1.5", r"tune\.selection\.alpha=1\.5 is out of range"),
    ("tune.selection.tie_break=val/acc", r"tune\.selection\.tie_break='val/acc' is not one of: none, val/loss"),
    ("+tune.selection.test=wilcoxon", r"tune\.selection\.test is not a key of tune\.selection"),
])
def test_bad_selection_settings_fail_before_ray_starts(cfg_factory, override, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweep(cfg_factory([override]))


# ---------------------------------------------------------------------------- a real sweep

@pytest.mark.integration
@pytest.mark.slow
def test_sweep_records_which_trials_the_validation_split_cannot_tell_apart(local_ray, cfg_factory, tmp_path: Path):
    from pipeline.tasks.data import ensure_data
    from pipeline.tasks.tune import tune

    # Ranked by accuracy, so that the tie-break on val/loss has ties to break.
    cfg = cfg_factory(["model=mlp", "tune.num_cpus=2", "tune.max_concurrent_trials=2", "tune.num_samples=4",
                       "tune.max_epochs=2", "tune.scheduler=fifo", "tune.metric=val/acc", "tune.mode=max"])
    ensure_data(cfg)
    best = tune(cfg)

    trials = {t["trial_id"]: t for t in sweeps.trials(tmp_path)}
    written = sweeps.best(tmp_path)
    selection = written["selection"]
    assert written["trial_id"] == best["trial_id"] and selection["test"] == "mcnemar_exact"
    assert selection["alpha"] == 0.05 and selection["tie_break"] == "val/loss"

    # Recompute every p-value from what the trials reported: the best epoch's correctness vector.
    vectors = {}
    for t in trials.values():
        [result_file] = Path(cfg.paths.out_dir, "results", "ray").glob(f"*/*{t['trial_id']}*/result.json")
        rows = [json.loads(line) for line in result_file.read_text().splitlines()]
        [row] = [r for r in rows if r["epoch"] == int(t["best_epoch"])]
        vectors[t["trial_id"]] = unpack(row[CORRECT_KEY])
        assert vectors[t["trial_id"]].mean() == pytest.approx(float(t["best_val_acc"]), abs=1e-6)
    n_val = {len(v) for v in vectors.values()}
    assert n_val == {selection["n_val"]} and selection["n_val"] > 200  # digits' validation split
    top = selection["top_trial_id"]
    assert float(trials[top]["best_val_acc"]) == max(float(t["best_val_acc"]) for t in trials.values())
    tied = set()
    for trial_id, t in trials.items():
        only_top = int(np.sum(vectors[top] & ~vectors[trial_id]))
        only_it = int(np.sum(~vectors[top] & vectors[trial_id]))
        p = binomtest(only_top, only_top + only_it, 0.5).pvalue if only_top + only_it else 1.0
        assert float(t["mcnemar_p"]) == pytest.approx(p, rel=1e-6)
        assert selection["p_values"][trial_id] == pytest.approx(p, abs=1e-6)
        assert t["indistinguishable"] == str(int(p >= 0.05))
        tied |= {trial_id} if p >= 0.05 else set()
    assert set(selection["indistinguishable"]) == tied and top in tied
    # The pick: the lowest val/loss among the tied trials.
    assert written["trial_id"] == min(tied, key=lambda i: float(trials[i]["val_loss"]))
    assert [i for i, t in trials.items() if t["selected"] == "1"] == [written["trial_id"]]
    assert written["val/loss"] == pytest.approx(float(trials[written["trial_id"]]["val_loss"]))

    client, parent, children = sweeps.tree(tmp_path)
    tags = parent.data.tags
    assert tags["best_trial_id"] == written["trial_id"] and tags["top_trial_id"] == top
    assert set(tags["indistinguishable_trials"].split(",")) == tied and tags["selection_test"] == "mcnemar_exact"
    assert parent.data.metrics["selection/indistinguishable"] == len(tied)
    assert parent.data.metrics["selection/n_val"] == selection["n_val"]
    assert parent.data.params["tune.selection.alpha"] == "0.05"
    assert parent.data.params["tune.selection.tie_break"] == "val/loss"
    for child in children:
        trial_id = child.data.tags["trial_id"]
        assert child.data.tags["indistinguishable_from_top"] == str(trial_id in tied).lower()
        assert child.data.tags["selected"] == str(trial_id == written["trial_id"]).lower()
        assert child.data.metrics["selection/mcnemar_p"] == pytest.approx(float(trials[trial_id]["mcnemar_p"]))
