"""pipeline.analysis.stats against scipy on fixed inputs, hand-checked Holm, planted comparisons."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from pipeline.analysis.stats import (
    TESTS,
    compare_alternatives,
    corrected_resampled_t_test,
    five_by_two_t_test,
    holm,
    mcnemar,
    paired_t_test,
    summarize,
    wilcoxon_signed_rank,
)

A = np.array([0.981, 0.975, 0.979, 0.984, 0.977, 0.980, 0.983])
B = np.array([0.962, 0.966, 0.958, 0.970, 0.961, 0.965, 0.959])
C = np.array([0.978, 0.979, 0.976, 0.985, 0.979, 0.977, 0.986])

# ----------------------------------------------------------------------------- summarize


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_summarize_matches_scipy_t_interval(confidence):
    s = summarize(A, confidence=confidence)
    lo, hi = stats.t.interval(confidence, df=A.size - 1, loc=A.mean(), scale=stats.sem(A))
    assert s["n"] == A.size and s["confidence"] == confidence
    assert s["mean"] == pytest.approx(A.mean())
    assert s["std"] == pytest.approx(A.std(ddof=1))
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert s["values"] == A.tolist()


def test_summarize_single_value_and_errors():
    assert summarize([0.7]) | {"values": None} == {
        "n": 1, "mean": 0.7, "std": 0.0, "confidence": 0.95, "ci_low": 0.7, "ci_high": 0.7,
        "values": None}
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([0.5, float("nan")])
    with pytest.raises(ValueError):
        summarize([0.5, 0.6], confidence=1.0)


def test_summarize_corrected_interval_by_hand():
    # [0.90, 0.92, 0.94, 0.96]: mean 0.93, deviations -0.03, -0.01, 0.01, 0.03, squares sum
    # 20e-4, std sqrt(20e-4/3) = 0.0258199. Two repetitions of 2 folds: factor 1/4 + 1/1 = 1.25
    # (a 2-fold trains on as many as it tests), so half = t(0.975, 3) * 0.0258199 * sqrt(1.25)
    # = 3.182446 * 0.0288675 = 0.0918693, where the plain interval has * sqrt(1/4): 0.0410852.
    values = [0.90, 0.92, 0.94, 0.96]
    s = summarize(values, variance_factor=1.25)
    assert s["ci_high"] - s["mean"] == pytest.approx(0.0918693, abs=1e-6)
    assert s["mean"] - s["ci_low"] == pytest.approx(0.0918693, abs=1e-6) and s["variance_factor"] == 1.25
    plain = summarize(values)
    assert plain["ci_high"] - plain["mean"] == pytest.approx(0.0410852, abs=1e-6) and "variance_factor" not in plain
    assert summarize(values, variance_factor=0.25) | {"variance_factor": None} == plain | {"variance_factor": None}


# ----------------------------------------------------------------------------- paired t


@pytest.mark.parametrize("a, b", [(A, B), (B, A), (A, C), ([1.0, 2.0, 4.0], [1.5, 1.0, 3.0])])
def test_paired_t_matches_scipy(a, b):
    res, ref = paired_t_test(a, b), stats.ttest_rel(a, b)
    d = np.asarray(a) - np.asarray(b)
    assert res["statistic"] == pytest.approx(ref.statistic)
    assert res["p_value"] == pytest.approx(ref.pvalue)
    assert res["mean_diff"] == pytest.approx(d.mean())
    assert res["cohens_dz"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert res["n"] == len(d)


def test_paired_t_degenerate_differences():
    same = paired_t_test(A, A)
    assert (same["statistic"], same["p_value"], same["cohens_dz"]) == (0.0, 1.0, 0.0)
    up = paired_t_test(A + 0.1, A)  # constant difference up to rounding
    assert (up["statistic"], up["p_value"], up["cohens_dz"]) == (math.inf, 0.0, math.inf)
    down = paired_t_test(A, A + 0.1)
    assert down["cohens_dz"] == -math.inf and down["p_value"] == 0.0
    with pytest.raises(ValueError):
        paired_t_test([0.5], [0.4])
    with pytest.raises(ValueError):
        paired_t_test(A, B[:-1])


# ----------------------------------------------------------------------------- Wilcoxon


@pytest.mark.parametrize("a, b", [
    (A, B), (A, C), (C, A),
    ([1, 2, 3, 4, 5, 6.5], [1.5, 2, 2, 3, 4, 5]),  # a zero and tied differences
    (np.arange(30.0), np.arange(30.0)[::-1] * 0.9),  # larger n
])
def test_wilcoxon_matches_scipy(a, b):
    res, ref = wilcoxon_signed_rank(a, b), stats.wilcoxon(a, b)
    assert res["statistic"] == pytest.approx(ref.statistic)
    assert res["p_value"] == pytest.approx(ref.pvalue)
    d = np.asarray(a, float) - np.asarray(b, float)
    nz = d[d != 0]
    ranks = stats.rankdata(np.abs(nz))
    r_plus, r_minus = ranks[nz > 0].sum(), ranks[nz < 0].sum()
    assert res["rank_biserial"] == pytest.approx((r_plus - r_minus) / (r_plus + r_minus))
    assert min(r_plus, r_minus) == pytest.approx(ref.statistic)
    assert res["n"] == len(d) and res["n_nonzero"] == nz.size


def test_wilcoxon_identical_and_one_sided_extremes():
    assert wilcoxon_signed_rank(A, A) == {"statistic": 0.0, "p_value": 1.0,
                                          "rank_biserial": 0.0, "n": 7, "n_nonzero": 0}
    all_better = wilcoxon_signed_rank(A, B)
    assert all_better["rank_biserial"] == 1.0
    assert all_better["p_value"] == pytest.approx(2 / 2**7)  # exact distribution
    assert wilcoxon_signed_rank(B, A)["rank_biserial"] == -1.0


# ----------------------------------------------------------------------------- McNemar


def _correct(n_both, b, c, n_none):
    ca = np.array([True] * n_both + [True] * b + [False] * c + [False] * n_none)
    cb = np.array([True] * n_both + [False] * b + [True] * c + [False] * n_none)
    return ca, cb


def test_mcnemar_exact_branch_matches_binomtest():
    ca, cb = _correct(80, 9, 2, 9)
    res = mcnemar(ca, cb)
    assert res["method"] == "exact" and (res["b"], res["c"], res["n"]) == (9, 2, 100)
    assert res["p_value"] == pytest.approx(stats.binomtest(9, 11, 0.5).pvalue)
    assert res["statistic"] == 2.0
    assert res["odds_ratio"] == pytest.approx(4.5)
    assert res["accuracy_diff"] == pytest.approx(0.07)
    assert (res["accuracy_a"], res["accuracy_b"]) == (pytest.approx(0.89), pytest.approx(0.82))


def test_mcnemar_chi2_branch():
    ca, cb = _correct(900, 40, 15, 45)
    res = mcnemar(ca, cb)
    stat = (abs(40 - 15) - 1) ** 2 / 55
    assert res["method"] == "chi2"
    assert res["statistic"] == pytest.approx(stat)
    assert res["p_value"] == pytest.approx(stats.chi2.sf(stat, 1))
    # Boundary: b + c = 24 is exact, 25 is chi-square.
    assert mcnemar(*_correct(10, 20, 4, 0))["method"] == "exact"
    assert mcnemar(*_correct(10, 20, 5, 0))["method"] == "chi2"


def test_mcnemar_identical_and_haldane():
    ca, _ = _correct(50, 5, 0, 10)
    same = mcnemar(ca, ca)
    assert (same["p_value"], same["b"], same["c"], same["odds_ratio"]) == (1.0, 0, 0, 1.0)
    assert same["accuracy_diff"] == 0.0
    one_sided = mcnemar(*_correct(50, 6, 0, 10))
    assert one_sided["odds_ratio"] == pytest.approx(6.5 / 0.5)
    assert one_sided["p_value"] == pytest.approx(stats.binomtest(6, 6, 0.5).pvalue)


def test_mcnemar_rejects_predictions_and_mismatched_lengths():
    with pytest.raises(ValueError, match="boolean"):
        mcnemar(np.array([0, 3, 1]), np.array([1, 1, 0]))
    with pytest.raises(ValueError):
        mcnemar(np.array([True, False]), np.array([True]))
    assert mcnemar([1, 0, 1], [True, True, False])["b"] == 1


# ----------------------------------------------------------------------------- Holm


def test_holm_hand_checked_example():
    # Sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06.
    res = holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    assert [r["p_adjusted"] for r in res] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [r["reject"] for r in res] == [True, False, False, True]
    assert [r["p_value"] for r in res] == [0.01, 0.04, 0.03, 0.005]


def test_holm_known_examples_cap_and_edges():
    # As statsmodels.stats.multitest.multipletests(method="holm") gives.
    res = holm([0.01, 0.02, 0.03, 0.04, 0.05])
    assert [r["p_adjusted"] for r in res] == pytest.approx([0.05, 0.08, 0.09, 0.09, 0.09])
    assert [r["reject"] for r in res] == [True, False, False, False, False]
    assert [r["p_adjusted"] for r in holm([0.5, 0.9])] == [1.0, 1.0]
    assert holm([]) == []
    assert holm([0.2])[0]["p_adjusted"] == 0.2
    with pytest.raises(ValueError):
        holm([0.1, float("nan")])
    with pytest.raises(ValueError):
        holm([1.5])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30), st.floats(0.001, 0.2))
def test_holm_properties(ps, alpha):
    res = holm(ps, alpha)
    adj = np.array([r["p_adjusted"] for r in res])
    p = np.array(ps)
    assert np.all(adj >= p) and np.all(adj <= 1.0)
    assert np.all(adj <= np.minimum(p * len(p), 1.0) + 1e-12)  # never worse than Bonferroni
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(adj[order]) >= 0)  # monotone in sorted order
    assert [r["reject"] for r in res] == [bool(x <= alpha) for x in adj]
    # Step-down rule: reject exactly the prefix of sorted p's with p_(i) <= alpha / (m - i).
    m = len(p)
    k = next((i for i, j in enumerate(order) if p[j] > alpha / (m - i)), m)
    assert sorted(j for j, r in enumerate(res) if r["reject"]) == sorted(order[:k].tolist())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=12),
       st.lists(st.floats(-0.5, 0.5), min_size=2, max_size=12))
def test_paired_tests_properties(xs, shifts):
    n = min(len(xs), len(shifts))
    a, b = np.array(xs[:n]), np.array(xs[:n]) + np.array(shifts[:n])
    t, w = paired_t_test(a, b), wilcoxon_signed_rank(a, b)
    assert 0.0 <= t["p_value"] <= 1.0 and 0.0 <= w["p_value"] <= 1.0
    assert -1.0 <= w["rank_biserial"] <= 1.0
    assert paired_t_test(b, a)["p_value"] == pytest.approx(t["p_value"])
    assert wilcoxon_signed_rank(b, a)["rank_biserial"] == pytest.approx(-w["rank_biserial"])


# ----------------------------------------------------------------------------- corrected t


def test_corrected_t_worked_by_hand():
    # d = a - b = [0.02, 0.04, 0.00, 0.06]: mean 0.03; deviations -0.01, 0.01, -0.03, 0.03;
    # squares sum to 20e-4, so var (ddof 1) = 20e-4 / 3. J = 4 folds of 300 train / 100 test:
    # factor = 1/4 + 100/300 = 7/12; t = 0.03 / sqrt(7/12 * 20e-4/3) = 0.03 / sqrt(35e-4/9)
    # = 1.521278...; df = 3. The plain paired t uses 1/4 alone: 0.03 / sqrt(20e-4/12) = 2.323790...
    b = np.full(4, 0.5)
    a = b + np.array([0.02, 0.04, 0.00, 0.06])
    res = corrected_resampled_t_test(a, b, n_train=300, n_test=100)
    assert res["statistic"] == pytest.approx(0.03 / math.sqrt(35e-4 / 9)) == pytest.approx(1.521278, abs=1e-6)
    assert res["df"] == 3 and res["n"] == 4 and res["variance_factor"] == pytest.approx(7 / 12)
    assert res["p_value"] == pytest.approx(2 * stats.t.sf(1.521278, 3), rel=1e-5)
    assert res["mean_diff"] == pytest.approx(0.03)
    assert paired_t_test(a, b)["statistic"] == pytest.approx(2.323790, abs=1e-6)
    assert res["p_value"] > paired_t_test(a, b)["p_value"]


@pytest.mark.parametrize("a, b", [(A, B), (B, A), (A, C)])
def test_corrected_t_without_test_share_is_scipy_paired_t(a, b):
    # n_test / n_train = 0 leaves the factor 1/J: the plain paired t-test, i.e. scipy's.
    res, ref = corrected_resampled_t_test(a, b, n_train=1, n_test=0), stats.ttest_rel(a, b)
    assert res["statistic"] == pytest.approx(ref.statistic)
    assert res["p_value"] == pytest.approx(ref.pvalue)
    # The factor scales t by sqrt((1/J) / (1/J + ratio)): J = 7, ratio 1/6 (7-fold CV).
    k7 = corrected_resampled_t_test(a, b, n_train=6, n_test=1)
    assert k7["statistic"] == pytest.approx(ref.statistic * math.sqrt((1 / 7) / (1 / 7 + 1 / 6)))


def test_corrected_t_degenerate_inputs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from 0/0 either
        same = corrected_resampled_t_test(A, A, n_train=4, n_test=1)
        assert (same["statistic"], same["p_value"], same["mean_diff"]) == (0.0, 1.0, 0.0)
        up = corrected_resampled_t_test(A + 0.1, A, n_train=4, n_test=1)
        assert up["statistic"] == math.inf and up["p_value"] == 0.0
        down = corrected_resampled_t_test(A, A + 0.1, n_train=4, n_test=1)
        assert down["statistic"] == -math.inf and down["p_value"] == 0.0
    with pytest.raises(ValueError, match="at least 2 pairs"):  # one fold: no variance to estimate
        corrected_resampled_t_test([0.5], [0.4], n_train=4, n_test=1)
    with pytest.raises(ValueError, match="n_train > 0"):
        corrected_resampled_t_test(A, B, n_train=0, n_test=1)


# ----------------------------------------------------------------------------- 5x2cv

# Differences per (repetition, fold) for the worked example below.
D52 = np.array([[0.02, 0.04], [0.01, 0.01], [0.00, 0.02], [0.03, 0.01], [0.02, 0.02]])


def test_five_by_two_worked_by_hand():
    # Repetition means 0.03, 0.01, 0.01, 0.02, 0.02, so s_i^2 = (0.01^2 + 0.01^2) = 2e-4, 0,
    # 2e-4, 2e-4, 0; their mean is 6e-4 / 5 = 1.2e-4. t = d_1^(1) / sqrt(1.2e-4)
    # = 0.02 / 0.0109545 = 1.825742...; df = 5 (Dietterich 1998, eq. for t~).
    b = np.full(10, 0.6)
    a = b + D52.reshape(-1)
    res = five_by_two_t_test(a, b)
    assert res["statistic"] == pytest.approx(0.02 / math.sqrt(1.2e-4)) == pytest.approx(1.825742, abs=1e-6)
    assert res["s2"] == pytest.approx([2e-4, 0, 2e-4, 2e-4, 0])
    assert res["df"] == 5 and res["p_value"] == pytest.approx(2 * stats.t.sf(1.825742, 5), rel=1e-5)
    # Only d_1^(1) is the numerator: reordering the other repetitions changes nothing.
    shuffled = np.vstack([D52[0], D52[4], D52[2], D52[1], D52[3]])
    assert five_by_two_t_test(b + shuffled.reshape(-1), b)["statistic"] == pytest.approx(res["statistic"])
    assert five_by_two_t_test(b, a)["statistic"] == pytest.approx(-res["statistic"])


def test_five_by_two_degenerate_inputs():
    x = np.linspace(0.8, 0.9, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = five_by_two_t_test(x, x)
        assert (same["statistic"], same["p_value"]) == (0.0, 1.0)
        shifted = five_by_two_t_test(x + 0.05, x)  # every s_i^2 is 0, d_1^(1) is not
        assert shifted["statistic"] == math.inf and shifted["p_value"] == 0.0
    with pytest.raises(ValueError, match="10 paired scores"):
        five_by_two_t_test(x[:4], x[:4])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=12),
       st.lists(st.floats(-0.5, 0.5), min_size=2, max_size=12), st.integers(2, 10))
def test_corrected_t_never_more_eager_than_paired_t(xs, shifts, k):
    n = min(len(xs), len(shifts))
    a, b = np.array(xs[:n]), np.array(xs[:n]) + np.array(shifts[:n])
    plain, corrected = paired_t_test(a, b), corrected_resampled_t_test(a, b, n_train=k - 1, n_test=1)
    assert 0.0 <= corrected["p_value"] <= 1.0
    assert corrected["p_value"] >= plain["p_value"] - 1e-12


# ----------------------------------------------------------------------------- compare


def _planted():
    rng = np.random.default_rng(0)
    good = 0.95 + rng.normal(0, 0.005, 5)
    return {"good": good.tolist(), "twin": good.tolist(),
            "bad": (0.3 + rng.normal(0, 0.01, 5)).tolist()}


def test_compare_identical_not_significant_and_worse_design_detected():
    out = compare_alternatives(_planted())
    assert [(p["a"], p["b"]) for p in out["pairs"]] == [
        ("good", "twin"), ("good", "bad"), ("twin", "bad")]
    twins, good_bad, _ = out["pairs"]
    assert not twins["significant"] and twins["better"] is None
    assert twins["t_test"]["p_value"] == 1.0 and twins["wilcoxon"]["p_value"] == 1.0
    assert twins["statement"].startswith("good and twin are not significantly different at 0.05")
    assert good_bad["significant"] and good_bad["better"] == "good" and good_bad["worse"] == "bad"
    assert good_bad["statement"].startswith("good is better than bad: mean 0.9")
    assert "significant at 0.05." in good_bad["statement"]
    # 5 folds: Wilcoxon cannot reach 0.05, and the statement says so.
    assert "Wilcoxon disagrees" in good_bad["statement"]
    assert "cannot reach p below 0.0625" in good_bad["statement"]
    assert out["statements"] == [p["statement"] for p in out["pairs"]]
    assert set(out["summaries"]) == {"good", "twin", "bad"}


def test_compare_holm_is_applied_per_family():
    out = compare_alternatives({"x": A, "y": B, "z": C})
    raw = [p["t_test"]["p_value"] for p in out["pairs"]]
    adj = [h["p_adjusted"] for h in holm(raw)]
    assert [p["t_test"]["p_adjusted"] for p in out["pairs"]] == adj
    raw_w = [p["wilcoxon"]["p_value"] for p in out["pairs"]]
    assert [p["wilcoxon"]["p_adjusted"] for p in out["pairs"]] == [
        h["p_adjusted"] for h in holm(raw_w)]
    assert all(p["mcnemar"] is None for p in out["pairs"])


def test_compare_lower_is_better():
    losses = {"low": [0.1, 0.12, 0.11, 0.09, 0.1], "high": [0.5, 0.52, 0.49, 0.51, 0.5]}
    pair = compare_alternatives(losses, higher_is_better=False)["pairs"][0]
    assert pair["significant"] and pair["better"] == "low"


def test_compare_with_mcnemar_and_reproducible():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 400)
    good = labels.copy()
    good[:8] = (good[:8] + 1) % 10  # 2% errors
    bad = labels.copy()
    bad[:120] = (bad[:120] + 1) % 10  # 30% errors
    scores = _planted()
    preds = {"good": good, "twin": good.copy(), "bad": bad}
    out = compare_alternatives(scores, preds, labels)
    twins, good_bad, twin_bad = out["pairs"]
    assert twins["mcnemar"]["p_value"] == 1.0 and twins["mcnemar"]["p_adjusted"] == 1.0
    assert good_bad["mcnemar"]["method"] == "chi2" and good_bad["mcnemar"]["reject"]
    assert "McNemar p<0.001" in good_bad["statement"]
    assert out == compare_alternatives(scores, preds, labels)
    json.dumps(out)  # plain Python types throughout


def test_compare_validation():
    with pytest.raises(ValueError, match="same number of folds"):
        compare_alternatives({"a": [0.1, 0.2], "b": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="both predictions and labels"):
        compare_alternatives({"a": [0.1, 0.2]}, predictions={"a": np.zeros(3)})
    with pytest.raises(ValueError, match="unknown design"):
        compare_alternatives({"a": [0.1, 0.2]}, {"q": np.zeros(3)}, np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        compare_alternatives({"a": [0.1, 0.2]}, {"a": np.zeros((3, 2))}, np.zeros(3))
    with pytest.raises(ValueError, match="at least 2 folds"):
        compare_alternatives({"a": [0.1], "b": [0.2]})
    single = compare_alternatives({"a": [0.1, 0.2]})
    assert single["pairs"] == [] and single["statements"] == []


def test_compare_test_choice_decides():
    # Five folds where the plain paired t rejects (p = 0.019) and the corrected one does not
    # (p = 0.063): the chosen test decides, both are reported, the statement names the dissent.
    scores = {"a": [0.90, 0.91, 0.92, 0.93, 0.95], "b": [0.85, 0.90, 0.90, 0.91, 0.92]}
    default = compare_alternatives(scores)
    pair = default["pairs"][0]
    assert default["test"] == "corrected_t" and not pair["significant"]
    assert pair["corrected_t"]["p_value"] > 0.05 > pair["t_test"]["p_value"]
    assert default["decision_reason"].startswith("corrected resampled t-test: the folds' training sets overlap")
    assert "Nadeau & Bengio 2003" in default["decision_reason"]
    assert "Paired t disagrees: significant" in pair["statement"]
    plain = compare_alternatives(scores, test="paired_t")
    assert plain["pairs"][0]["significant"] and plain["pairs"][0]["better"] == "a"
    assert "Corrected t disagrees: not significant" in plain["pairs"][0]["statement"]
    # Sizes given: 5-fold CV of 400 samples has 320 train / 80 test, the same ratio 1/4.
    sized = compare_alternatives(scores, n_train=320, n_test=80)
    assert sized["pairs"][0]["corrected_t"]["p_value"] == pytest.approx(pair["corrected_t"]["p_value"])
    assert set(TESTS) == {"corrected_t", "paired_t", "wilcoxon", "five_by_two"}


def test_compare_five_by_two_and_holm_on_deciding_test():
    b = np.full(10, 0.6)
    scores = {"x": (b + D52.reshape(-1)).tolist(), "y": b.tolist(), "z": (b + 0.001).tolist()}
    out = compare_alternatives(scores, test="five_by_two", repeats=5)
    assert (out["folds"], out["repeats"], out["n_folds"]) == (2, 5, 10)
    raw = [p["five_by_two"]["p_value"] for p in out["pairs"]]
    assert [p["five_by_two"]["p_adjusted"] for p in out["pairs"]] == [h["p_adjusted"] for h in holm(raw)]
    assert [p["significant"] for p in out["pairs"]] == [p["five_by_two"]["reject"] for p in out["pairs"]]
    assert out["pairs"][0]["five_by_two"]["statistic"] == pytest.approx(1.825742, abs=1e-6)
    # Repeated folds: each summary's interval is the corrected one, 1/10 + 1/1 (2 folds).
    assert out["summaries"]["x"]["variance_factor"] == pytest.approx(1.1)
    assert "variance_factor" not in compare_alternatives(scores)["summaries"]["x"]
    # Other designs compute no 5x2cv test, and refuse to decide by one.
    assert compare_alternatives(scores, repeats=2)["pairs"][0]["five_by_two"] is None
    with pytest.raises(ValueError, match="5 repetitions of 2 folds"):
        compare_alternatives(scores, test="five_by_two")
    with pytest.raises(ValueError, match="not 3 repetitions"):
        compare_alternatives(scores, repeats=3)
    with pytest.raises(ValueError, match="not one of"):
        compare_alternatives(scores, test="bogus")
