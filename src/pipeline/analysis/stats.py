"""Summaries and paired significance tests for comparing model designs across CV folds.

Every function is pure (no I/O, no randomness) and returns plain Python scalars, lists and
dicts, so results are reproducible and can be written straight to JSON or MLflow.

Fold scores of two designs are *paired*: fold k of both used the same train/validation split,
so the tests work on per-fold differences rather than treating the scores as independent
samples, which would hide the (large) fold-to-fold variation shared by both designs.
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


def summarize(values: ArrayLike, confidence: float = 0.95) -> dict[str, Any]:
    """n, mean, sample std (ddof=1) and a Student-t confidence interval of the mean.

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
        half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / np.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "confidence": confidence,
            "ci_low": mean - half, "ci_high": mean + half, "values": x.tolist()}


def paired_t_test(a: ArrayLike, b: ArrayLike) -> dict[str, Any]:
    """Two-sided paired t-test of a vs b with Cohen's d_z = mean(a - b) / sd(a - b).

    Equals `scipy.stats.ttest_rel` whenever the differences vary. When they are all equal
    (up to floating-point rounding of the inputs) the t statistic is 0/0 or x/0, so:
    identical samples -> statistic 0, p = 1, d_z = 0 ("no difference"); a constant non-zero
    difference -> statistic and d_z = +/-inf, p = 0 (every fold moves the same way by the same
    amount: as strong as paired evidence gets). scipy returns NaN or an unstable value there.
    """
    x, y = _paired(a, b, minimum=2)
    d = x - y
    n, mean_diff = d.size, float(np.mean(d))
    # Differences spread by less than the rounding error of a - b carry no information.
    tol = 8 * np.finfo(float).eps * max(np.max(np.abs(x)), np.max(np.abs(y)))
    sd = float(np.std(d, ddof=1))
    # sd can underflow to 0 for subnormal differences even when their spread exceeds tol.
    if np.ptp(d) <= tol or sd == 0:
        if np.all(d == 0) or abs(mean_diff) <= tol:
            statistic, p, d_z = 0.0, 1.0, 0.0
        else:
            statistic = d_z = float(np.copysign(np.inf, mean_diff))
            p = 0.0
    else:
        res = stats.ttest_rel(x, y)
        statistic, p = float(res.statistic), float(res.pvalue)
        d_z = mean_diff / sd
    return {"statistic": statistic, "p_value": p, "mean_diff": mean_diff, "cohens_dz": d_z, "n": n}


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


def _statement(pair: dict[str, Any], means: dict[str, float], alpha: float) -> str:
    t, w, mc = pair["t_test"], pair["wilcoxon"], pair["mcnemar"]
    tests = (f"paired t p{_p(t['p_value'])}, Holm-adjusted {_num(t['p_adjusted'])}; "
             f"Wilcoxon p{_p(w['p_value'])}, Holm-adjusted {_num(w['p_adjusted'])}")
    if mc is not None:
        tests += f"; McNemar p{_p(mc['p_value'])}, Holm-adjusted {_num(mc['p_adjusted'])}"
    if pair["significant"]:
        hi, lo = pair["better"], pair["worse"]
        text = (f"{hi} is better than {lo}: mean {means[hi]:.3f} vs {means[lo]:.3f} ({tests}); "
                f"significant at {alpha:g}.")
    else:
        a, b = pair["a"], pair["b"]
        text = (f"{a} and {b} are not significantly different at {alpha:g} "
                f"(mean {means[a]:.3f} vs {means[b]:.3f}; {tests}).")
    for name, res in (("Wilcoxon", w), ("McNemar", mc)):
        if res is not None and res["reject"] != pair["significant"]:
            verdict = "significant" if res["reject"] else "not significant"
            text += f" {name} disagrees: {verdict} (Holm-adjusted p{_p(res['p_adjusted'])})"
            if name == "Wilcoxon" and not res["reject"] and 2 / 2 ** w["n_nonzero"] > alpha:
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
) -> dict[str, Any]:
    """Summarise each design and compare every pair, with Holm correction per test family.

    `scores[name]` holds one score per fold, folds in the same order for every design (paired).
    Pairs are taken in the order of `scores` (itertools.combinations), so the output is stable.
    Per pair: paired t-test and Wilcoxon over folds, and McNemar on per-sample correctness when
    `predictions` (class indices on the shared test set given by `labels`) exist for both.
    Holm is applied across all pairs separately within each family (t, Wilcoxon, McNemar).

    Decision rule: a pair is "significant" iff its Holm-adjusted paired t-test p <= alpha. The
    t-test is used because, with the usual 3-10 folds, the Wilcoxon test has almost no power
    (exact p >= 0.0625 with 5 folds) and McNemar needs a shared test set and ignores fold
    variation. Disagreeing tests are named in the statement so the reader can judge.
    """
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
            "t_test": paired_t_test(data[a], data[b]),
            "wilcoxon": wilcoxon_signed_rank(data[a], data[b]),
            "mcnemar": mcnemar(correct[a], correct[b]) if both else None,
        })
    for family in ("t_test", "wilcoxon", "mcnemar"):
        members = [p[family] for p in pairs if p[family] is not None]
        for res, adj in zip(members, holm([r["p_value"] for r in members], alpha)):
            res["p_adjusted"], res["reject"] = adj["p_adjusted"], adj["reject"]

    means = {name: float(np.mean(v)) for name, v in data.items()}
    for pair in pairs:
        pair["significant"] = pair["t_test"]["reject"]
        a_wins = sign * pair["mean_diff"] > 0
        winner, loser = (pair["a"], pair["b"]) if a_wins else (pair["b"], pair["a"])
        pair["better"] = winner if pair["significant"] else None
        pair["worse"] = loser if pair["significant"] else None
        pair["statement"] = _statement(pair, means, alpha)
    return {
        "alpha": alpha, "n_folds": n, "higher_is_better": higher_is_better,
        "decision_rule": "Holm-adjusted paired t-test p <= alpha",
        "summaries": {name: summarize(v, confidence) for name, v in data.items()},
        "pairs": pairs, "statements": [p["statement"] for p in pairs],
    }
