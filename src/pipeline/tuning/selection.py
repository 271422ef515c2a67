"""Honest selection among a sweep's trials.

A validation split of a few hundred images cannot tell 0.996 from 1.000 (one image), yet
taking the maximum picks one of them as if it could. So each trial reports which validation
samples its best epoch classified correctly (`pipeline.tuning.predictions`, packed into the
result under `CORRECT_KEY`); after the sweep, an exact McNemar test of every trial against
the top one (by the sweep's metric) says which the split cannot tell apart from it by
accuracy at `alpha`, and among those the pick is the one with the lowest validation loss,
which keeps ranking where accuracy has run out of samples to count (with `tune.cv`, the
folds' mean val/loss). When the sweep ranks by val/loss itself, the top trial is the pick
and the test records which trials are as accurate. A saturated accuracy (the best within
one sample of 100%, or several trials sharing the best value) is named, so nobody mistakes
the pick for a measured winner.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CORRECT_KEY = "val_correct"  # in a trial's results: "<n>:<base64 of the packed correctness bits>"
TIE_BREAKS = ("val/loss", "none")  # tune.selection.tie_break


def pack(correct: np.ndarray) -> str:
    """A boolean vector as `"<n>:<base64>"` (one bit a sample: 34 bytes for 269 images)."""
    bits = np.asarray(correct, dtype=bool)
    return f"{bits.size}:{base64.b64encode(np.packbits(bits).tobytes()).decode()}"


def unpack(text: Any) -> np.ndarray | None:
    """`pack`'s vector again; None when `text` is missing or not a packed vector."""
    if not isinstance(text, str) or ":" not in text:
        return None
    size, _, data = text.partition(":")
    try:
        n = int(size)
        bits = np.unpackbits(np.frombuffer(base64.b64decode(data, validate=True), dtype=np.uint8))
    except ValueError:
        return None
    if n < 0 or bits.size < n or bits.size - n >= 8:
        return None
    return bits[:n].astype(bool)


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value of two classifiers' correctness on the same samples:
    of the samples exactly one of them gets right (`n`), how unlikely a split at least as
    uneven is if each were equally likely to be the one (Binomial(n, 1/2)). 1.0 when they
    disagree nowhere.

    The binomial tail is summed in integers (exact for any `n`, under a second at n = 100 000),
    so the sweep's driver does not import scipy.stats for it: about a second of a `dvc repro`'s
    tune stage, after the trials have finished (tests check it against scipy's binomial test)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length: {a.size} and {b.size}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    term = tail = 1  # C(n, 0), then C(n, i) for i up to the smaller count
    for i in range(1, min(only_a, only_b) + 1):
        term = term * (n - i + 1) // i
        tail += term
    return min(1.0, 2 * tail / (1 << n))  # int / int: correctly rounded, however large


@dataclass(frozen=True)
class Candidate:
    """A trial with a finite score: its metric, validation loss and correctness vector."""

    trial_id: str
    value: float
    loss: float = math.nan
    correct: np.ndarray | None = None


@dataclass(frozen=True)
class Selection:
    chosen: str                           # the trial the sweep keeps
    top: str                              # the highest (or lowest, mode min) metric
    test: str                             # "mcnemar_exact", or "none" (exact ties only)
    alpha: float
    tie_break: str
    p_values: dict[str, float | None]     # each candidate against `top` (None: not testable)
    indistinguishable: tuple[str, ...]    # from `top` (itself included), best tie-break first
    saturated: str                        # why the metric saturates, "" if it does not
    n_val: int | None                     # validation samples behind the vectors

    def summary(self) -> dict[str, Any]:
        """What best.yaml and the MLflow parent record."""
        return {"test": self.test, "alpha": self.alpha, "tie_break": self.tie_break, "top_trial_id": self.top,
                "indistinguishable": list(self.indistinguishable), "saturated": self.saturated or None,
                "n_val": self.n_val,
                "p_values": {k: (None if v is None else round(v, 6)) for k, v in self.p_values.items()}}


def _loss(c: Candidate) -> float:
    return c.loss if math.isfinite(c.loss) else math.inf


def saturation(candidates: Sequence[Candidate], top: Candidate, metric: str, mode: str,
               n_val: int | None) -> str:
    """Why `metric` cannot rank these trials, or "": the best within one sample of a perfect
    accuracy, or several trials sharing the best value."""
    reasons = []
    if mode == "max" and metric.endswith("/acc") and n_val and top.value >= 1 - 1 / n_val - 1e-9:
        errors = round((1 - top.value) * n_val)
        reasons.append(f"the best {metric} {top.value:.4f} is {errors} error(s) in {n_val} validation samples")
    shared = [c for c in candidates if math.isclose(c.value, top.value, rel_tol=0, abs_tol=1e-9)]
    if len(shared) > 1:
        reasons.append(f"{len(shared)} trials share the best {metric} {top.value:.4g}")
    return "; ".join(reasons)


def select(candidates: Sequence[Candidate], *, metric: str, mode: str, alpha: float = 0.05,
           tie_break: str = "val/loss") -> Selection:
    """The trial to keep among `candidates` (at least one), and why.

    `top` is the best by the metric (an exact tie goes to the lower val/loss, then the
    trial id). With a correctness vector for `top`, every trial with a vector of the same
    length is tested against `top` (exact McNemar on the two accuracies) and is
    indistinguishable from it when p >= alpha; a trial without one (`tune.cv`, DDP trials)
    only when it ties the metric exactly. The pick is the indistinguishable trial with the
    lowest val/loss (`tie_break="val/loss"`), or `top` itself (`"none"`)."""
    if not candidates:
        raise ValueError("select() needs at least one candidate")
    sign = 1 if mode == "max" else -1
    top = min(candidates, key=lambda c: (-sign * c.value, _loss(c), c.trial_id))
    paired = top.correct is not None
    p_values: dict[str, float | None] = {}
    tied = []
    for c in candidates:
        if c is top:
            p_values[c.trial_id] = 1.0
        elif paired and c.correct is not None and c.correct.shape == top.correct.shape:
            p_values[c.trial_id] = mcnemar_exact(top.correct, c.correct)
        else:
            p_values[c.trial_id] = None
        p = p_values[c.trial_id]
        if (p >= alpha) if p is not None else math.isclose(c.value, top.value, rel_tol=0, abs_tol=1e-9):
            tied.append(c)
    tied.sort(key=lambda c: (_loss(c), -sign * c.value, c.trial_id))
    chosen = top if tie_break == "none" else tied[0]
    n_val = int(top.correct.size) if top.correct is not None else None
    return Selection(chosen=chosen.trial_id, top=top.trial_id, test="mcnemar_exact" if paired else "none",
                     alpha=alpha, tie_break=tie_break, p_values=p_values,
                     indistinguishable=tuple(c.trial_id for c in tied),
                     saturated=saturation(candidates, top, metric, mode, n_val), n_val=n_val)


def explain(selection: Selection, metric: str) -> str:
    """One line for the log and the console: what was picked among what, and why."""
    others = len(selection.indistinguishable) - 1
    if selection.test == "none":
        how = "exact ties only: no correctness vectors to test"
    else:
        how = f"exact McNemar test, alpha {selection.alpha:g}, {selection.n_val} validation samples"
    text = (f"{others} other trial(s) are statistically indistinguishable from the top trial {selection.top} "
            f"by {metric} ({how})")
    if selection.chosen != selection.top:
        text += f"; picked {selection.chosen} among them by the lowest {selection.tie_break}"
    elif others and selection.tie_break != "none":
        text += f"; kept it: it also has the lowest {selection.tie_break} among them"
    return text
