"""A Ray Tune sweep seen in the real MLflow UI: a real `mlflow server`, a tiny real sweep
tracked to it, and the experiment's runs page rendered by headless Chromium.

The MLflow UI is a React app, so the page is driven through Chromium's DevTools protocol
(`--remote-debugging-port`, over the websocket client of aiohttp, which MLflow depends on):

- MLflow 3 opens an experiment on its GenAI overview; the training runs table is the
  `#/experiments/<id>/runs` route.
- Child runs are collapsed under their parent: the parent's Run Name cell has an expander
  button (`data-component-id` ending in `runnamecellrenderer.tsx_<n>`). Before it is
  clicked only the parent row is shown; after, the children's rows follow it.
- Table rows carry `row-id` = the run id (the grid renders each row twice: pinned and
  scrolled columns).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils

from pipeline.tasks.data import ensure_data
from pipeline.tasks.tune import tune

EXPERIMENT = "cnn-pipeline"
UI_TIMEOUT_S = 90  # the first load of the UI bundle on a busy 2-CPU box
SWEEP = ["model=mlp", "tune.num_cpus=2", "tune.max_concurrent_trials=2", "tune.num_samples=4",
         "tune.max_epochs=2", "tune.scheduler=fifo"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000", "--remote-debugging-port=0"]


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


# ---------------------------------------------------------------------------- chromium

def _chromium() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
    if not os.access(chromium, os.X_OK):
        pytest.fail("Chromium is not installed: `apt-get install -y chromium` (Debian) to run this test.")
    return chromium


class Page:
    """One Chromium tab over the DevTools protocol: `evaluate` JavaScript, `screenshot`."""

    def __init__(self, ws: Any) -> None:
        self.ws, self.n = ws, 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:  # skip events and older replies
            message = await asyncio.wait_for(self.ws.receive(), timeout=60)
            assert message.type.name == "TEXT", f"DevTools connection closed: {message}"
            reply = json.loads(message.data)
            if reply.get("id") == self.n:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = UI_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.5)
        text = await self.evaluate("document.body ? document.body.innerText : ''")
        pytest.fail(f"the MLflow UI did not show {what} within {timeout} s; the page reads:\n{text[-3000:]}")

    async def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"]))


def _devtools_page_url(profile: Path, proc: subprocess.Popen) -> str:
    """The websocket URL of the browser's first tab (the port Chromium chose is written to
    `<user-data-dir>/DevToolsActivePort`)."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None:
            pytest.fail(f"chromium exited with {proc.returncode} before opening DevTools")
        if time.monotonic() > deadline:
            pytest.fail("chromium did not open its DevTools port within 60 s")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
        targets = json.load(response)
    return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")


async def _with_page(ws_url: str, body) -> Any:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        page = Page(ws)
        await page.call("Page.enable")
        return await body(page)


# JavaScript: the run-table row ids (run ids) shown, in order, and the parent row's expander.
ROW_IDS = ("Array.from(new Set(Array.from(document.querySelectorAll('.ag-center-cols-container [role=row]'))"
           ".sort((a, b) => Number(a.getAttribute('row-index')) - Number(b.getAttribute('row-index')))"
           ".map(r => r.getAttribute('row-id'))))")


def _expand(run_id: str) -> str:
    return (f"(() => {{ const rows = document.querySelectorAll('[role=row][row-id=\"{run_id}\"]');"
            "for (const row of rows) { const b = row.querySelector("
            "'button[data-component-id*=\"runnamecellrenderer\"]'); if (b) { b.click(); return true; } }"
            "return false; })()")


def _in_chromium(chromium: str, tmp_path: Path, check) -> Any:
    """Run `check(page)` in a fresh headless Chromium (its own profile), then close it."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return asyncio.run(_with_page(_devtools_page_url(profile, proc), check))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# ---------------------------------------------------------------------------- test

@pytest.mark.integration
@pytest.mark.slow
def test_sweep_shows_nested_in_the_mlflow_ui(mlflow_server, cfg_factory, tmp_path: Path) -> None:
    chromium = _chromium()
    url = mlflow_server["url"]
    cfg = cfg_factory([*SWEEP, f"tracking.tracking_uri={url}"])
    ensure_data(cfg)
    best = tune(cfg)

    # The tree as the server stores it: one parent, four finished children.
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 == len(runs) - 1
    assert parent.data.tags["best_trial_id"] == best["trial_id"]
    names = {r.info.run_id: r.info.run_name for r in runs}
    assert all(names.values()) and len(set(names.values())) == 5, names
    child_ids = {c.info.run_id for c in children}
    # Each trial's datasets, as MLflow datasets: the split's train and validation subsets.
    digests = set()
    for child in children:
        contexts = {{t.key: t.value for t in d.tags}["mlflow.data.context"]: d.dataset for d in child.inputs.dataset_inputs}
        assert set(contexts) == {"training", "validation"} and {d.name for d in contexts.values()} == {"digits"}
        digests.add(contexts["training"].digest)
    assert len(digests) == 1  # one split for all trials
    assert not any(k.startswith("system/") for c in children for k in c.data.metrics)  # only when asked
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

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
        assert await page.evaluate(_expand(parent.info.run_id)), "no expander in the parent run's row"
        await page.wait_for(f"{ROW_IDS}.length >= 5", "the child runs after expanding the parent")
        await asyncio.sleep(1)  # let the grid settle before the screenshot
        await page.screenshot(shot)
        return {"collapsed": collapsed, "collapsed_text": collapsed_text,
                "expanded": await page.evaluate(ROW_IDS),
                "text": await page.evaluate("document.body.innerText")}

    seen = _in_chromium(chromium, tmp_path, check)

    # Collapsed: only the parent; expanded: the parent, then its four children right below it.
    assert seen["collapsed"] == [parent.info.run_id], seen["collapsed"]
    assert "5 matching runs" in seen["collapsed_text"]
    for child in children:
        assert child.info.run_name not in seen["collapsed_text"], child.info.run_name
    assert seen["expanded"][0] == parent.info.run_id and set(seen["expanded"][1:]) == child_ids, seen["expanded"]
    for name in names.values():
        assert name in seen["text"], f"run {name!r} is not on the rendered page"
    assert f"digits ({digests.pop()})" in seen["text"], "the Dataset column does not show the trials' dataset"

    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "the screenshot is not a PNG"
    width, height = struct.unpack(">II", png[16:24])
    # The viewport: the window's width, its height less the (invisible) browser frame.
    assert width == 1400 and height >= 600 and len(png) > 20_000, (width, height, len(png))


@pytest.mark.integration
@pytest.mark.slow
def test_cv_sweep_shows_fold_runs_under_their_trial(mlflow_server, cfg_factory, tmp_path: Path) -> None:
    """With tune.cv=true: parent -> one run per trial -> one run per fold, in the UI too."""
    chromium = _chromium()
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
        assert await page.evaluate(_expand(parent.info.run_id)), "no expander in the parent run's row"
        await page.wait_for(f"{ROW_IDS}.includes('{trial.info.run_id}')", "the trial runs")
        assert await page.evaluate(_expand(trial.info.run_id)), "no expander in the trial run's row"
        await page.wait_for(f"{ROW_IDS}.length >= 5", "the fold runs after expanding the trial")
        return {"rows": await page.evaluate(ROW_IDS), "text": await page.evaluate("document.body.innerText")}

    seen = _in_chromium(chromium, tmp_path, check)
    rows = seen["rows"]
    # The trial's fold runs sit right below it; the parent's other trial is still collapsed.
    at = rows.index(trial.info.run_id)
    assert set(rows[at + 1:at + 3]) == folds, rows
    assert rows[0] == parent.info.run_id and len(rows) == 5, rows
    for run in runs:
        if run.info.run_id in folds:
            assert run.info.run_name in seen["text"] and run.info.run_name.endswith(("fold0", "fold1"))
