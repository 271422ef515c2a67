"""bench/calibration.py: its counting and intervals by hand, and one tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[1] / "bench" / "calibration.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("calibration_bench", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_wilson_interval_by_hand(bench):
    # 5 of 10, z = 1.959964: centre (0.5 + z^2/20) / (1 + z^2/10) = 0.5;
    # half-width z * sqrt(0.25/10 + z^2/400) / (1 + z^2/10) = 1.959964 * 0.186021 / 1.384146 = 0.263407.
    z = 1.959964
    half = z * math.sqrt(0.025 + z * z / 400) / (1 + z * z / 10)
    assert half == pytest.approx(0.263407, abs=1e-6)
    assert bench.wilson(5, 10) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-6)
    # 0 of 20: the lower end is 0 and the upper (z^2/20) / (1 + z^2/20) = 0.161125, not 0 (Wald's).
    assert bench.wilson(0, 20) == pytest.approx((0.0, (z * z / 20) / (1 + z * z / 20)), abs=1e-6)
    with pytest.raises(ValueError):
        bench.wilson(3, 2)


def test_rates_count_p_at_or_below_alpha(bench):
    ps = {("kfold", "t_test"): [0.01, 0.05, 0.2, 0.9], ("kfold", "corrected_t"): [0.06, 0.3, 0.5, 0.9],
          ("5x2", "five_by_two"): [0.049, 0.5, 0.5, 0.5]}
    found = {(r.design, r.name): r for r in bench.rates(ps)}
    assert (found["kfold", "paired_t"].rejections, found["kfold", "paired_t"].nulls) == (2, 4)  # 0.05 rejects
    assert found["kfold", "corrected_t"].rejections == 0 and found["5x2", "5x2cv"].fpr == 0.25
    assert ("kfold", "wilcoxon") not in found  # no p-values, no row
    line = bench.headline(list(found.values()), "5-fold")
    cell = {n: bench.Rate("", "", n, 4).cell() for n in (0, 1, 2)}
    assert cell[2] == f"0.50 [{bench.wilson(2, 4)[0]:.2f}, {bench.wilson(2, 4)[1]:.2f}]"
    assert line == (f"calibration: 5-fold paired_t FPR {cell[2]}, corrected_t FPR {cell[0]}; "
                    f"5x2 folds 5x2cv FPR {cell[1]} over 4 nulls (alpha 0.05)")


def test_every_null_makes_both_designs_from_its_own_seeds(bench, monkeypatch):
    # The loop alone (scores drawn at random, no training): each null splits anew, the k-fold
    # design keeps its own repetitions after a 5x2 one, and the seed twins move on per null.
    seen = []

    def fake_null(self, splits, seeds):
        seen.append((len(splits.folds), splits.repeats, splits.params["seed"], seeds))
        rng = np.random.default_rng(seeds[0])
        return {"a": rng.random(len(splits.folds)).tolist(), "b": rng.random(len(splits.folds)).tolist()}

    monkeypatch.setattr(bench.Bench, "null", fake_null)
    found = bench.run(3, 1, 5, 0, repeats=2, log=lambda line: None)
    assert seen == [(10, 2, 0, (0, 1)), (10, 5, 0, (0, 1)), (10, 2, 1000, (2, 3)), (10, 5, 1000, (2, 3)),
                    (10, 2, 2000, (4, 5)), (10, 5, 2000, (4, 5))]
    assert len(found) == 6 and all(r.nulls == 3 for r in found)


def test_a_tiny_run_prints_its_headline_last(bench, capsys):
    line = bench.main(["--nulls", "1", "--epochs", "1", "--folds", "2", "--repeats", "2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == line and line.startswith("calibration: 2x2-fold paired_t FPR ")
    assert "; 5x2 folds paired_t FPR " in line and line.endswith("over 1 nulls (alpha 0.05)")
    rows = [row for row in out if row.startswith(("| 2x2-fold |", "| 5x2 |"))]
    assert len(rows) == 6 and all("/1 |" in row for row in rows)
