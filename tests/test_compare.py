"""Comparing designs end to end: a planted worse design is found, identical ones are not."""

from __future__ import annotations

import json

import pytest

from pipeline.tasks.compare import alternatives, compare
from pipeline.tasks.data import ensure_data

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
    assert (tmp_path / "out" / "reports" / "compare_folds.png").stat().st_size > 1000
    # Reproducible: the same seed gives the same numbers.
    again = compare(cfg)
    assert json.dumps(again["summaries"]) == json.dumps(stats["summaries"])
