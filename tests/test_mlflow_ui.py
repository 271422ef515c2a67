"""A Ray Tune sweep seen in the real MLflow UI: a real `mlflow server`, a tiny real sweep
tracked to it, and the experiment's runs page rendered by headless Chromium (tests/browser.py).
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils

from browser import ROW_IDS, Page, chromium, expand, in_chromium
from pipeline.models.transfer import load_state
from pipeline.tasks.data import ensure_data
from pipeline.tasks.evaluate import evaluate
from pipeline.tasks.train import train
from pipeline.tasks.tune import tune
from pipeline.tracking.mlflow_run import scoped_tracking_uri

EXPERIMENT = "cnn-pipeline"
# conf/tune/lr_decay_dropout.yaml's space, in the compare view's (alphabetical) order
SEARCHED = ["optimizer.lr", "regularizer.dropout", "scheduler.decay"]
SWEEP = ["model=mlp", "tune.num_cpus=2", "tune.max_concurrent_trials=2", "tune.num_samples=4",
         "tune.max_epochs=2", "tune.scheduler=fifo"]


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty working directory, MLflow's process-global tracking URI restored afterwards, and
    a Ray of our own: with no address, `ray.init` joins the latest Ray on the machine (from
    /tmp/ray/ray_current_cluster), e.g. another test run's; RAY_ADDRESS=local starts a new one."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setenv("RAY_ADDRESS", "local")


# ---------------------------------------------------------------------------- test

@pytest.mark.integration
@pytest.mark.slow
def test_sweep_shows_nested_in_the_mlflow_ui(mlflow_server, cfg_factory, tmp_path: Path) -> None:
    """A sweep, then one train + evaluate run on its best values (the DVC pipeline's order),
    tracked to a real server; in the UI: the runs table, the Dataset column, the nested sweep,
    the Compare view of the trials (Runs table: select, Compare), the registered champion."""
    browser = chromium()
    url = mlflow_server["url"]
    cfg = cfg_factory([*SWEEP, f"tracking.tracking_uri={url}"])
    ensure_data(cfg)
    best = tune(cfg)
    train(cfg)
    test = evaluate(cfg)  # registers the model: tracking.register is on for the evaluate task

    # The tree as the server stores it: one parent, four finished children; and the train run.
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2, [r.info.run_name for r in parents]
    parent = next(r for r in parents if r.data.tags.get("sweep"))
    trained = next(r for r in parents if r is not parent)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 == len(runs) - 2
    assert parent.data.tags["best_trial_id"] == best["trial_id"]
    names = {r.info.run_id: r.info.run_name for r in runs}
    assert all(names.values()) and len(set(names.values())) == 6, names
    child_ids = {c.info.run_id for c in children}
    # Each trial's datasets, as MLflow datasets: the split's train and validation subsets.
    digests = set()
    for child in children:
        contexts = {{t.key: t.value for t in d.tags}["mlflow.data.context"]: d.dataset for d in child.inputs.dataset_inputs}
        assert set(contexts) == {"training", "validation"} and {d.name for d in contexts.values()} == {"digits"}
        digests.add(contexts["training"].digest)
        # The searched values, also as tags; as params, the only ones that differ between trials.
        searched = {k.removeprefix("searched."): v for k, v in child.data.tags.items() if k.startswith("searched.")}
        assert set(searched) == set(SEARCHED) and all(child.data.params[k] == v for k, v in searched.items())
    assert len(digests) == 1  # one split for all trials
    assert not any(k.startswith("system/") for c in children for k in c.data.metrics)  # only when asked
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # The registry on a real server: version 1 is the champion, and loads as transfer.source does.
    model = "cnn-pipeline-digits"
    champion = client.get_model_version_by_alias(model, "champion")
    assert str(champion.version) == "1" and champion.run_id == trained.info.run_id
    assert client.get_run(trained.info.run_id).data.tags["registry.champion"].startswith(
        f"champion: {test['test/acc']:.4f}")
    with scoped_tracking_uri(url):
        weights = load_state(f"models:/{model}@champion")
        logged = load_state(f"runs:/{trained.info.run_id}/model")
    assert weights.keys() == logged.keys() and all(torch.equal(weights[k], logged[k]) for k in logged)

    shot = tmp_path / "mlflow-ui.png"
    # The experiment's own address in the "Model training" view (the link the
    # README gives): the UI opens on the runs table. MLflow 3.17's UI picks the view from that
    # switch (default GenAI, remembered by the browser), not from the experiment's kind tag.
    page_url = f"{url}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"

    async def check(page: Page) -> dict[str, Any]:
        await page.call("Page.navigate", url=page_url)
        parent_row = f"document.querySelector('[role=row][row-id=\"{parent.info.run_id}\"]') !== null"
        await page.wait_for(parent_row, f"the parent run {parent.info.run_name!r}")
        collapsed = await page.evaluate(ROW_IDS)
        collapsed_text = await page.evaluate("document.body.innerText")
        assert await page.evaluate(expand(parent.info.run_id)), "no expander in the parent run's row"
        await page.wait_for(f"{ROW_IDS}.length >= 6", "the child runs after expanding the parent")
        await asyncio.sleep(1)  # let the grid settle before the screenshot
        await page.screenshot(shot)
        seen = {"collapsed": collapsed, "collapsed_text": collapsed_text, "expanded": await page.evaluate(ROW_IDS),
                "text": await page.evaluate("document.body.innerText")}
        # Compare: tick the trials' rows, press Compare.
        for run_id in child_ids:
            assert await page.evaluate(_tick(run_id)), f"no checkbox in the row of trial {run_id}"
        assert await page.evaluate(PRESS_COMPARE), "no Compare button once runs are selected"
        await page.wait_for("document.querySelector('.parcoords .axis-title') !== null",
                            "the parallel coordinates plot of the compare view")
        seen["compare_url"] = await page.evaluate("decodeURIComponent(location.href)")
        seen["axes"] = await page.evaluate(
            "Array.from(document.querySelectorAll('.parcoords .axis-title')).map(e => e.textContent)")
        # The registry: the model, its version and the alias.
        await page.call("Page.navigate", url=f"{url}/#/models/{model}")
        await page.wait_for("document.body !== null && document.body.innerText.includes('champion')",
                            "the registered model's champion alias")
        seen["registry"] = await page.evaluate("document.body.innerText")
        return seen

    seen = in_chromium(browser, tmp_path, check)

    # Collapsed: the two top-level runs; expanded: the parent, then its four children right below it.
    assert set(seen["collapsed"]) == {parent.info.run_id, trained.info.run_id}, seen["collapsed"]
    assert "6 matching runs" in seen["collapsed_text"]
    for child in children:
        assert child.info.run_name not in seen["collapsed_text"], child.info.run_name
    at = seen["expanded"].index(parent.info.run_id)
    assert set(seen["expanded"][at + 1:at + 5]) == child_ids, seen["expanded"]
    for name in names.values():
        assert name in seen["text"], f"run {name!r} is not on the rendered page"
    assert f"digits ({digests.pop()})" in seen["text"], "the Dataset column does not show the trials' dataset"
    # Compare of the four trials: the searched params, then val/acc, as parallel axes.
    assert "#/compare-runs" in seen["compare_url"] and all(i in seen["compare_url"] for i in child_ids)
    assert seen["axes"] == [*SEARCHED, "val/acc"], seen["axes"]
    # The registry page: the model, version 1 and its alias.
    assert model in seen["registry"] and "Version 1" in seen["registry"]
    assert "@\u00a0champion" in seen["registry"] or "@ champion" in seen["registry"], seen["registry"][:2000]

    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "the screenshot is not a PNG"
    width, height = struct.unpack(">II", png[16:24])
    # The viewport: the window's width, its height less the (invisible) browser frame.
    assert width == 1400 and height >= 600 and len(png) > 20_000, (width, height, len(png))


def _tick(run_id: str) -> str:
    """JavaScript: tick the selection checkbox of a run's row (false if there is none)."""
    return (f"(() => {{ const box = document.querySelector('[role=row][row-id=\"{run_id}\"] input.ag-checkbox-input');"
            " if (!box) return false; box.click(); return true; })()")


PRESS_COMPARE = ("(() => { const b = Array.from(document.querySelectorAll('button'))"
                 ".find(b => b.innerText.trim() === 'Compare'); if (!b) return false; b.click(); return true; })()")


@pytest.mark.integration
@pytest.mark.slow
def test_cv_sweep_shows_fold_runs_under_their_trial(mlflow_server, cfg_factory, tmp_path: Path) -> None:
    """With tune.cv=true: parent -> one run per trial -> one run per fold, in the UI too."""
    browser = chromium()
    url = mlflow_server["url"]
    cfg = cfg_factory(["model=mlp", "tune.num_cpus=2", "tune.max_concurrent_trials=2", "tune.num_samples=1",
                       "tune.max_epochs=1", "tune.scheduler=fifo", "tune.cv=true", "data.split.folds=2",
                       "~tune.space", '+tune.space={optimizer.lr: "grid[0.001, 0.01]"}',
                       f"tracking.tracking_uri={url}", "tracking.experiment_name=cv-sweeps"])
    ensure_data(cfg)
    tune(cfg)

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("cv-sweeps")  # its own: the server is the module's
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2 and len(runs) == 1 + 2 + 2 * 2
    trial = trials[0]
    folds = {r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id}
    assert len(folds) == 2
    # Datasets: the trial trained on the folds; each fold run on its own part of them.
    fold_digests = set()
    for run in runs:
        contexts = {{t.key: t.value for t in d.tags}["mlflow.data.context"]: d.dataset.digest
                    for d in run.inputs.dataset_inputs}
        if run.info.run_id in folds:
            assert set(contexts) == {"training", "validation"}
            fold_digests.add(contexts["validation"])
        elif run.info.run_id == trial.info.run_id:
            assert set(contexts) == {"training"}
    assert len(fold_digests) == 2  # fold 0 and fold 1 validate on different images

    async def check(page: Page) -> dict[str, Any]:
        await page.call("Page.navigate", url=f"{url}/#/experiments/{experiment.experiment_id}/runs")
        await page.wait_for(f"document.querySelector('[role=row][row-id=\"{parent.info.run_id}\"]') !== null",
                            "the sweep's parent run")
        assert await page.evaluate(expand(parent.info.run_id)), "no expander in the parent run's row"
        await page.wait_for(f"{ROW_IDS}.includes('{trial.info.run_id}')", "the trial runs")
        assert await page.evaluate(expand(trial.info.run_id)), "no expander in the trial run's row"
        await page.wait_for(f"{ROW_IDS}.length >= 5", "the fold runs after expanding the trial")
        return {"rows": await page.evaluate(ROW_IDS), "text": await page.evaluate("document.body.innerText")}

    seen = in_chromium(browser, tmp_path, check)
    rows = seen["rows"]
    # The trial's fold runs sit right below it; the parent's other trial is still collapsed.
    at = rows.index(trial.info.run_id)
    assert set(rows[at + 1:at + 3]) == folds, rows
    assert rows[0] == parent.info.run_id and len(rows) == 5, rows
    for run in runs:
        if run.info.run_id in folds:
            assert run.info.run_name in seen["text"] and run.info.run_name.endswith(("fold0", "fold1"))
