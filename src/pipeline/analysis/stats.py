"""Summaries and paired significance tests for comparing model designs across CV folds.

Every function is pure (no I/O, no randomness) and returns plain Python scalars, lists and
dicts, so results are reproducible and can be written straight to JSON or MLflow.

Fold scores of two designs are *paired*: fold k of both used the same train/validation split,
so the tests work on per-fold differences rather than treating the scores as independent
samples, which would hide the (large) fold-to-fold variation shared by both designs.

The fold differences are not independent either: any two folds' training sets share most of
their samples. The plain paired t-test ignores that and finds differences too often; the
corrected resampled t-test (Nadeau & Bengio 2003) and Dietterich's 5x2cv test allow for it,
and `compare_alternatives` decides with the corrected one unless told otherwise.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

MCNEMAR_EXACT_BELOW = 25  # b + c below this: exact binomial test; the chi-square is poor there


def _vector(values: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        # A NaN score usually means a failed fold; silently dropping it would break the pairing.
        raise ValueError(f"{name} contains NaN or infinite values: {x.tolist()}")
    return x


def _paired(a: ArrayLike, b: ArrayLike, minimum: int = 1) -> tuple[np.ndarray, np.ndarray]:
    x, y = _vector(a, "a"), _vector(b, "b")
    if x.size != y.size:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}")
    if x.size < minimum:
        raise ValueError(f"need at least {minimum} pairs, got {x.size}")
    return x, y


def summarize(values: ArrayLike, confidence: float = 0.95, *, variance_factor: float | None = None) -> dict[str, Any]:
    """n, mean, sample std (ddof=1) and a Student-t confidence interval of the mean.

    The interval's variance is std^2 / n, or std^2 * `variance_factor` when given: repeated
    cross-validation passes Nadeau & Bengio's 1/n + n_test/n_train, as its r x k scores share
    data and are far from n independent ones (the result then holds `variance_factor`).
    With one value there is no spread to estimate: std is 0 and the interval is the value
    itself (rather than NaN), so a single-fold run still produces a readable report.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = _vector(values, "values")
    n, mean = x.size, float(np.mean(x))
    if n == 1:
        std = half = 0.0
    else:
        std = float(np.std(x, ddof=1))
        # t rather than normal quantiles: with 3-10 folds the normal CI is far too narrow.
        scale = 1 / np.sqrt(n) if variance_factor is None else np.sqrt(variance_factor)
        half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std * float(scale)
    out = {"n": n, "mean": mean, "std": std, "confidence": confidence,
           "ci_low": mean - half, "ci_high": mean + half, "values": x.tolist()}
    if variance_factor is not None:
        out["variance_factor"] = variance_factor
    return out


def _no_spread(x: np.ndarray, y: np.ndarray, d: np.ndarray) -> tuple[float, float] | None:
    """(statistic, p) when the differences `d` do not vary, where a t statistic is 0/0 or x/0:
    no difference at all -> (0, 1); a constant non-zero difference -> (+/-inf, 0) (every fold
    moves the same way by the same amount: as strong as paired evidence gets). None otherwise.
    """
    mean_diff = float(np.mean(d))
    # Differences spread by less than the rounding error of a - b carry no information.
    tol = 8 * np.finfo(float).eps * max(np.max(np.abs(x)), np.max(np.abs(y)))
    # sd can underflow to 0 for subnormal differences even when their spread exceeds tol.
    if np.ptp(d) > tol and np.std(d, ddof=1) > 0:
        return None
    if np.all(d == 0) or abs(mean_diff) <= tol:
        return 0.0, 1.0
    return float(np.copysign(np.inf, mean_diff)), 0.0


def paired_t_test(a: ArrayLike, b: ArrayLike) -> dict[str, Any]:
    """Two-sided paired t-test of a vs b with Cohen's d_z = mean(a - b) / sd(a - b).

    Equals `scipy.stats.ttest_rel` whenever the differences vary. When they are all equal
    (up to floating-point rounding of the inputs) the t statistic is 0/0 or x/0, so:
    identical samples -> statistic 0, p = 1, d_z = 0 ("no difference"); a constant non-zero
    difference -> statistic and d_z = +/-inf, p = 0. scipy returns NaN or an unstable value there.

    Over cross-validation folds this test is too eager: the folds' training sets overlap, so
    their differences are correlated, not independent (see `corrected_resampled_t_test`).
    """
    x, y = _paired(a, b, minimum=2)
    d = x - y
    n, mean_diff = d.size, float(np.mean(d))
    flat = _no_spread(x, y, d)
    if flat is not None:
        statistic, p = flat
        d_z = statistic if np.isinf(statistic) else 0.0
    else:
        res = stats.ttest_rel(x, y)
        statistic, p = float(res.statistic), float(res.pvalue)
        d_z = mean_diff / float(np.std(d, ddof=1))
    return {"statistic": statistic, "p_value": p, "mean_diff": mean_diff, "cohens_dz": d_z, "n": n}


def corrected_resampled_t_test(a: ArrayLike, b: ArrayLike, *, n_train: float, n_test: float) -> dict[str, Any]:
    """Nadeau & Bengio's (2003) corrected resampled t-test of a vs b over J = k*r paired folds
    (r repetitions of k-fold CV; Bouckaert & Frank 2004), two-sided.

    t = mean(d) / sqrt((1/J + n_test/n_train) * var(d)), df = J - 1, where d = a - b per fold,
    var has ddof=1, and n_train, n_test are the (mean) training and testing sizes of a fold.
    The plain paired t-test uses 1/J alone: it assumes independent folds, but overlapping
    training sets correlate them; n_test/n_train stands in for that correlation. With
    n_test = 0 this is exactly the paired t-test. Degenerate differences are treated as in
    `paired_t_test` (identical scores: statistic 0, p = 1). Fewer than 2 folds: ValueError
    (no variance to estimate).
    """
    if not (n_train > 0 and n_test >= 0):
        raise ValueError(f"need n_train > 0 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    x, y = _paired(a, b, minimum=2)
    d = x - y
    j, mean_diff = d.size, float(np.mean(d))
    factor = 1.0 / j + n_test / n_train
    flat = _no_spread(x, y, d)
    if flat is not None:
        statistic, p = flat
    else:
        statistic = mean_diff / float(np.sqrt(factor * np.var(d, ddof=1)))
        p = float(2 * stats.t.sf(abs(statistic), df=j - 1))
    return {"statistic": float(statistic), "p_value": p, "mean_diff": mean_diff, "n": j, "df": j - 1,
            "n_train": float(n_train), "n_test": float(n_test), "variance_factor": factor}


def five_by_two_t_test(a: ArrayLike, b: ArrayLike) -> dict[str, Any]:
    """Dietterich's (1998) 5x2cv paired t-test of a vs b, two-sided.

    a and b hold 10 scores: 5 repetitions of 2-fold CV, repetition-major
    ([rep 1 fold 1, rep 1 fold 2, rep 2 fold 1, ...]). With d_i^(j) = a - b in fold j of
    repetition i, its mean m_i and s_i^2 = (d_i^(1) - m_i)^2 + (d_i^(2) - m_i)^2:
    t = d_1^(1) / sqrt(mean_i s_i^2), df = 5. Only the first difference is the numerator, by
    design. No spread (every s_i^2 = 0, up to rounding): d_1^(1) = 0 -> statistic 0, p = 1;
    otherwise +/-inf, p = 0, as in `paired_t_test`.
    """
    x, y = _paired(a, b)
    if x.size != 10:
        raise ValueError(f"the 5x2cv test needs 10 paired scores (5 repetitions x 2 folds), got {x.size}")
    d = (x - y).reshape(5, 2)
    s2 = ((d - d.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    first = float(d[0, 0])
    tol = 8 * np.finfo(float).eps * max(np.max(np.abs(x)), np.max(np.abs(y)))
    if np.sqrt(s2.mean()) <= tol:
        statistic, p = (0.0, 1.0) if abs(first) <= tol else (float(np.copysign(np.inf, first)), 0.0)
    else:
        statistic = first / float(np.sqrt(s2.mean()))
        p = float(2 * stats.t.sf(abs(statistic), df=5))
    return {"statistic": float(statistic), "p_value": p, "mean_diff": float(d.mean()), "n": 10, "df": 5,
            "s2": s2.tolist()}


def wilcoxon_signed_rank(a: ArrayLike, b: ArrayLike) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of a vs b, with the rank-biserial correlation.

    Uses scipy's defaults (zero differences dropped; exact or permutation null distribution
    for small n, as scipy chooses). The effect size r = (R+ - R-) / (R+ + R-) lies in [-1, 1]
    and is positive when a tends to exceed b. Identical samples give p = 1 and r = 0 directly:
    scipy raises (older versions) or warns for all-zero differences. Note that with n non-zero
    differences the exact two-sided p can never fall below 2 / 2**n (0.0625 for n = 5).
    """
    x, y = _paired(a, b)
    d = x - y
    nz = d[d != 0]
    if nz.size == 0:
        return {"statistic": 0.0, "p_value": 1.0, "rank_biserial": 0.0, "n": int(d.size),
                "n_nonzero": 0}
    ranks = stats.rankdata(np.abs(nz))  # average ranks for ties, as scipy does
    r_plus, r_minus = float(ranks[nz > 0].sum()), float(ranks[nz < 0].sum())
    res = stats.wilcoxon(x, y)
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue),
            "rank_biserial": (r_plus - r_minus) / (r_plus + r_minus), "n": int(d.size),
            "n_nonzero": int(nz.size)}


def _correctness(values: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(values)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of per-sample correctness")
    if x.dtype != bool:
        # Catch class predictions passed by mistake: they would be silently cast to "correct".
        if not np.all((x == 0) | (x == 1)):
            raise ValueError(f"{name} must be boolean (correct per sample), not predictions")
        x = x.astype(bool)
    return x


def mcnemar(correct_a: ArrayLike, correct_b: ArrayLike) -> dict[str, Any]:
    """McNemar's test on per-sample correctness of two models over the SAME test samples.

    Only discordant samples matter: b = A right & B wrong, c = A wrong & B right. With
    b + c < 25 the p-value is the exact two-sided binomial test of b ~ Bin(b + c, 1/2) and the
    statistic is min(b, c); otherwise the chi-square (|b - c| - 1)^2 / (b + c) with continuity
    correction, 1 d.o.f. No discordant samples -> p = 1. Effect sizes: the odds ratio b / c
    (Haldane: +0.5 to both cells when either is 0, so it stays finite) and the accuracy
    difference acc_A - acc_B = (b - c) / n.
    """
    x, y = _correctness(correct_a, "correct_a"), _correctness(correct_b, "correct_b")
    if x.shape != y.shape:
        raise ValueError(f"correctness arrays differ in length: {x.size} vs {y.size}")
    b, c = int(np.sum(x & ~y)), int(np.sum(~x & y))
    if b + c == 0:
        method, statistic, p = "exact", 0.0, 1.0
    elif b + c < MCNEMAR_EXACT_BELOW:
        method, statistic = "exact", float(min(b, c))
        p = float(stats.binomtest(b, b + c, 0.5).pvalue)
    else:
        method, statistic = "chi2", (abs(b - c) - 1) ** 2 / (b + c)
        p = float(stats.chi2.sf(statistic, df=1))
    odds = (b + 0.5) / (c + 0.5) if b == 0 or c == 0 else b / c
    n = int(x.size)
    return {"statistic": float(statistic), "p_value": min(p, 1.0), "method": method, "b": b,
            "c": c, "n": n, "odds_ratio": odds, "accuracy_a": float(x.mean()),
            "accuracy_b": float(y.mean()), "accuracy_diff": (b - c) / n}


def holm(p_values: ArrayLike, alpha: float = 0.05) -> list[dict[str, Any]]:
    """Holm-Bonferroni step-down adjustment, returned in the input order.

    Sorted ascending, p_(i) (0-based) is multiplied by m - i; a running maximum keeps the
    adjusted values monotone in that order, and they are capped at 1. A hypothesis is
    rejected iff its adjusted p <= alpha, which is the same as Holm's step-down rule.
    Controls the family-wise error rate under any dependence between the tests.
    """
    p = np.asarray(p_values, dtype=float).reshape(-1)
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must be in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")  # stable: ties keep input order, output reproducible
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(np.maximum.accumulate((m - np.arange(m)) * p[order]), 1.0)
    return [{"p_value": float(pv), "p_adjusted": float(pa), "reject": bool(pa <= alpha)}
            for pv, pa in zip(p, adjusted)]


def _num(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3g}"


def _p(p: float) -> str:
    return _num(p) if p < 0.001 else f"={_num(p)}"


# compare.test -> (the pair's result key, its name, why it decides: one plain sentence).
TESTS: dict[str, tuple[str, str, str]] = {
    "corrected_t": ("corrected_t", "corrected resampled t-test",
                    "the folds' training sets overlap, so their score differences are correlated and the "
                    "plain paired t-test is too eager; this test widens its variance by n_test/n_train "
                    "to allow for that (Nadeau & Bengio 2003; Bouckaert & Frank 2004)."),
    "paired_t": ("t_test", "paired t-test",
                 "chosen by compare.test=paired_t; it treats the folds as independent although their "
                 "training sets overlap, so it finds differences too often (Nadeau & Bengio 2003)."),
    "wilcoxon": ("wilcoxon", "Wilcoxon signed-rank test",
                 "chosen by compare.test=wilcoxon; it assumes no normal distribution, but like the paired "
                 "t-test treats overlapping folds as independent, and with few folds it has little power."),
    "five_by_two": ("five_by_two", "5x2cv paired t-test",
                    "chosen by compare.test=five_by_two; within each of its 5 repetitions the two halves "
                    "share no training data, which keeps its variance estimate honest (Dietterich 1998)."),
}
FAMILIES = ("corrected_t", "t_test", "wilcoxon", "five_by_two", "mcnemar")
LABELS = {"corrected_t": "corrected t", "t_test": "paired t", "wilcoxon": "Wilcoxon",
          "five_by_two": "5x2cv t", "mcnemar": "McNemar"}


def _statement(pair: dict[str, Any], means: dict[str, float], alpha: float, deciding: str) -> str:
    order = [deciding, *(f for f in FAMILIES if f != deciding)]
    tests = "; ".join(f"{LABELS[f]} p{_p(pair[f]['p_value'])}, Holm-adjusted {_num(pair[f]['p_adjusted'])}"
                      for f in order if pair.get(f) is not None)
    if pair["significant"]:
        hi, lo = pair["better"], pair["worse"]
        text = (f"{hi} is better than {lo}: mean {means[hi]:.3f} vs {means[lo]:.3f} ({tests}); "
                f"significant at {alpha:g}.")
    else:
        a, b = pair["a"], pair["b"]
        text = (f"{a} and {b} are not significantly different at {alpha:g} "
                f"(mean {means[a]:.3f} vs {means[b]:.3f}; {tests}).")
    for family in order[1:]:
        res = pair.get(family)
        if res is not None and res["reject"] != pair["significant"]:
            verdict = "significant" if res["reject"] else "not significant"
            name = LABELS[family][0].upper() + LABELS[family][1:]
            text += f" {name} disagrees: {verdict} (Holm-adjusted p{_p(res['p_adjusted'])})"
            w = pair["wilcoxon"]
            if family == "wilcoxon" and not res["reject"] and 2 / 2 ** w["n_nonzero"] > alpha:
                text += (f"; with {w['n_nonzero']} non-zero fold differences it cannot reach "
                         f"p below {2 / 2 ** w['n_nonzero']:.3g}")
            text += "."
    return text


def compare_alternatives(
    scores: dict[str, ArrayLike],
    predictions: dict[str, np.ndarray] | None = None,
    labels: np.ndarray | None = None,
    alpha: float = 0.05,
    *,
    confidence: float = 0.95,
    higher_is_better: bool = True,
    test: str = "corrected_t",
    repeats: int = 1,
    n_train: float | None = None,
    n_test: float | None = None,
) -> dict[str, Any]:
    """Summarise each design and compare every pair, with Holm correction per test family.

    `scores[name]` holds one score per fold, folds in the same order for every design (paired):
    `repeats` repetitions of k-fold CV, repetition-major. Pairs are taken in the order of
    `scores` (itertools.combinations), so the output is stable. Per pair: the corrected
    resampled t-test (fold sizes `n_train`, `n_test`; without them the k-fold ratio
    n_test/n_train = 1/(k-1)), the paired t-test and Wilcoxon over folds, the 5x2cv t-test when
    the folds are 5 x 2, and McNemar on per-sample correctness when `predictions` (class
    indices on the shared test set given by `labels`) exist for both. Holm is applied across
    all pairs separately within each family.

    Decision rule: a pair is "significant" iff the Holm-adjusted p of the `test` (a key of
    TESTS) is <= alpha; the others are reported beside it, and disagreeing ones are named in
    the statement so the reader can judge. `five_by_two` needs 5 repetitions of 2 folds.
    """
    if test not in TESTS:
        raise ValueError(f"test={test!r} is not one of: {', '.join(TESTS)}")
    if not scores:
        raise ValueError("scores is empty: nothing to compare")
    data = {name: _vector(v, f"scores[{name!r}]") for name, v in scores.items()}
    n_folds = {v.size for v in data.values()}
    if len(n_folds) != 1:
        raise ValueError(f"every design needs the same number of folds, got "
                         f"{ {k: v.size for k, v in data.items()} }")
    n = n_folds.pop()
    if len(data) > 1 and n < 2:
        raise ValueError("paired tests need at least 2 folds per design")
    if repeats < 1 or n % repeats:
        raise ValueError(f"{n} scores per design are not {repeats} repetitions of the same number of folds")
    k = n // repeats
    five_by_two = (k, repeats) == (2, 5)
    if test == "five_by_two" and not five_by_two:
        raise ValueError(f"the 5x2cv test needs 5 repetitions of 2 folds, got {repeats} of {k}")
    if (n_train is None) != (n_test is None):
        raise ValueError("pass both n_train and n_test (a fold's training and testing sizes) or neither")
    if n_train is None:
        n_train, n_test = max(k - 1, 1), 1.0  # k-fold: each fold tests on 1/k and trains on (k-1)/k
    correct: dict[str, np.ndarray] = {}
    if (predictions is None) != (labels is None):
        raise ValueError("pass both predictions and labels (for McNemar) or neither")
    if predictions is not None:
        y = np.asarray(labels)
        for name, pred in predictions.items():
            if name not in data:
                raise ValueError(f"predictions for unknown design {name!r}")
            pred = np.asarray(pred)
            if pred.shape != y.shape or y.ndim != 1:
                raise ValueError(f"predictions[{name!r}] shape {pred.shape} != labels {y.shape}; "
                                 "pass 1-D class indices (argmax of the outputs)")
            correct[name] = pred == y

    sign = 1.0 if higher_is_better else -1.0
    pairs: list[dict[str, Any]] = []
    for a, b in combinations(data, 2):
        both = a in correct and b in correct
        pairs.append({
            "a": a, "b": b, "mean_diff": float(np.mean(data[a] - data[b])),
            "corrected_t": corrected_resampled_t_test(data[a], data[b], n_train=n_train, n_test=n_test),
            "t_test": paired_t_test(data[a], data[b]),
            "wilcoxon": wilcoxon_signed_rank(data[a], data[b]),
            "five_by_two": five_by_two_t_test(data[a], data[b]) if five_by_two else None,
            "mcnemar": mcnemar(correct[a], correct[b]) if both else None,
        })
    for family in FAMILIES:
        members = [p[family] for p in pairs if p[family] is not None]
        for res, adj in zip(members, holm([r["p_value"] for r in members], alpha)):
            res["p_adjusted"], res["reject"] = adj["p_adjusted"], adj["reject"]

    deciding, test_name, reason = TESTS[test]
    means = {name: float(np.mean(v)) for name, v in data.items()}
    for pair in pairs:
        pair["significant"] = pair[deciding]["reject"]
        a_wins = sign * pair["mean_diff"] > 0
        winner, loser = (pair["a"], pair["b"]) if a_wins else (pair["b"], pair["a"])
        pair["better"] = winner if pair["significant"] else None
        pair["worse"] = loser if pair["significant"] else None
        pair["statement"] = _statement(pair, means, alpha, deciding)
    return {
        "alpha": alpha, "n_folds": n, "folds": k, "repeats": repeats, "higher_is_better": higher_is_better,
        "test": test, "deciding_key": deciding, "decision_rule": f"Holm-adjusted {test_name} p <= alpha",
        "decision_reason": f"{test_name}: {reason}", "n_train": float(n_train), "n_test": float(n_test),
        # Repeated folds: the corrected interval (see summarize); one repetition: the plain one.
        "summaries": {name: summarize(v, confidence, variance_factor=1 / n + n_test / n_train if repeats > 1 else None)
                      for name, v in data.items()},
        "pairs": pairs, "statements": [p["statement"] for p in pairs],
    }
