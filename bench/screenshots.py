"""The README's screenshots of the MLflow UI and of the HTML report, taken with headless Chromium.

    python bench/screenshots.py                 # a tiny real sweep and train run, then the shots
    python bench/screenshots.py --out docs/img  # (the default folder)

It fills a fresh store in a temporary project with the real pipeline (a 4-trial MLP sweep
on digits, then train on its best values + evaluate, which the registry makes champion,
and its HTML report), serves it with a real `mlflow server`, and saves into `--out`:
  mlflow-runs.png      the experiment's runs table, the sweep expanded (Dataset column)
  mlflow-compare.png   Compare of the sweep's trials: searched params against val/acc
  mlflow-registry.png  the registered model and its `champion` alias
  report.png           the top of the HTML report (`pipeline report`)
The browser is the one the UI tests drive (tests/browser.py); Chromium must be installed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the Chromium driver and the real-server helper

from browser import ROW_IDS, Page, chromium, expand, in_chromium  # noqa: E402
from conftest import make_cfg  # noqa: E402
from servers import mlflow_server  # noqa: E402

SWEEP = ["model=mlp", "tune.num_cpus=2", "tune.max_concurrent_trials=2", "tune.num_samples=4",
         "tune.max_epochs=3", "tune.scheduler=fifo"]
EXPERIMENT = "cnn-pipeline"


def fill(project: Path, tracking_uri: str) -> dict[str, str]:
    """Run the real pipeline into `tracking_uri`; what the shots need to find."""
    from mlflow import MlflowClient

    from pipeline.tasks.data import ensure_data
    from pipeline.tasks.evaluate import evaluate
    from pipeline.tasks.report import report
    from pipeline.tasks.train import train
    from pipeline.tasks.tune import tune
    from pipeline.tracking.registry import model_name

    os.environ.setdefault("RAY_ADDRESS", "local")  # a Ray of our own, not another one on the machine
    # The DVC pipeline's order: the sweep, then train on its best values, evaluate, report.
    cfg = make_cfg(project, [*SWEEP, f"tracking.tracking_uri={tracking_uri}"], epochs=3)
    ensure_data(cfg)
    tune(cfg)
    train(cfg)
    evaluate(cfg)  # registers the model (tracking.register: on for the evaluate stage)
    page = report(cfg)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("sweep") and "mlflow.parentRunId" not in r.data.tags)
    trials = [r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return {"experiment": experiment.experiment_id, "parent": parent.info.run_id, "trials": trials,
            "model": model_name(EXPERIMENT, cfg.data.name), "report": page.as_uri()}


def shoot(url: str, found: dict, out: Path, profile_root: Path) -> None:
    import json

    async def shots(page: Page) -> None:
        await page.call("Page.navigate", url=f"{url}/#/experiments/{found['experiment']}?workflowType=machine_learning")
        await page.wait_for(f"document.querySelector('[role=row][row-id=\"{found['parent']}\"]') !== null",
                            "the sweep's parent run")
        await page.evaluate(expand(found["parent"]))
        await page.wait_for(f"{ROW_IDS}.length >= {1 + len(found['trials'])}", "the trials")
        await _settle(page, out / "mlflow-runs.png")

        runs = json.dumps(found["trials"])
        await page.call("Page.navigate", url=f"{url}/#/compare-runs?runs={runs}&experiments=[\"{found['experiment']}\"]")
        await page.wait_for("document.querySelector('.parcoords') !== null", "the parallel coordinates plot")
        await page.evaluate("document.querySelector('.parcoords').scrollIntoView({block: 'center'})")
        await _settle(page, out / "mlflow-compare.png")

        await page.call("Page.navigate", url=f"{url}/#/models/{found['model']}")
        await page.wait_for("document.body.innerText.includes('champion')", "the champion alias")
        await _settle(page, out / "mlflow-registry.png")

        await page.call("Page.navigate", url=found["report"])
        await page.wait_for("document.readyState === 'complete' && document.images.length > 0", "the report")
        await _settle(page, out / "report.png")

    in_chromium(chromium(), profile_root, shots)


# MLflow 3.17 opens its (GenAI) assistant beside every page: closed, the page has the room.
CLOSE_ASSISTANT = ("(() => { const b = document.querySelector("
                   "'button[data-component-id=\"mlflow.assistant.chat_panel.close\"]'); if (b) b.click(); })()")


async def _settle(page: Page, path: Path) -> None:
    await page.evaluate(CLOSE_ASSISTANT)
    await asyncio.sleep(2)  # fonts, plots and the grid's last layout pass
    await page.screenshot(path)
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="screenshots-") as tmp:
        tmp = Path(tmp)
        (tmp / "server").mkdir()
        with mlflow_server(tmp / "server", f"sqlite:///{tmp / 'server' / 'mlflow.db'}") as server:
            found = fill(tmp / "project", server.url)
            shoot(server.url, found, args.out.resolve(), tmp)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
