"""What the commands print when they end, as a user sees it: the MLflow run id and its UI link
(train, tune, cv, compare, report), a multirun's labelled jobs and its table, and a DVC
stage's summary, the same lines as its command's. Real `pipeline` processes on a real SQLite
store in a temporary project; every run a link names is looked up in that store."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.tracking.links import run_url, ui_hint
from procs import BIN, project_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# One epoch or two of a few batches, two folds: what is checked is the console, not the model.
SMALL = ["model=mlp", "data.split.folds=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
         "trainer.enable_progress_bar=false", "tune.use_best=false", "tracking.system_metrics=false",
         "tracking.log_model=false"]
# `<label>: <run id>  <link>`; the link's run id is the line's.
RUN_LINE = re.compile(r"^(run|sweep run): ([0-9a-f]{32})  http://127\.0\.0\.1:5000/#/experiments/(\d+)/runs/\2$",
                      re.M)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("console")
    (project / "dvc.yaml").write_text("stages: {}\n")  # the project root (paths.root)
    return project


def _run(project: Path, cmd: list[str]) -> str:
    done = subprocess.run(cmd, cwd=project, env=project_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _pipeline(project: Path, job: str, *overrides: str) -> str:
    return _run(project, [str(BIN / "pipeline"), job, *overrides, *SMALL, f"paths.root={project}"])


def _runs_in_store(project: Path, out: str) -> list[str]:
    """The run ids `out`'s run lines name, each checked against the store: it exists, in the
    experiment its link names; and the line saying how to open the store follows, once."""
    from mlflow.tracking import MlflowClient

    found = RUN_LINE.findall(out)
    assert found, out
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    for _, run_id, experiment_id in found:
        assert client.get_run(run_id).info.experiment_id == experiment_id
    assert out.count(ui_hint(f"sqlite:///{project / 'mlflow.db'}")) == 1, out
    return [run_id for _, run_id, _ in found]


@pytest.fixture(scope="module")
def multirun(project: Path) -> str:
    """Two jobs of `pipeline train -m`: 1 and 2 epochs."""
    return _pipeline(project, "train", "-m", "trainer.max_epochs=1,2")


def test_a_multirun_labels_its_jobs_and_ends_with_their_table(project, multirun):
    lines = multirun.splitlines()
    # Each job says which it is before anything of its own, then its results and its run.
    starts = [lines.index(f"[job {i}] trainer.max_epochs={i + 1}") for i in (0, 1)]
    title = next(i for i, line in enumerate(lines) if line.startswith("2 jobs, each with "))
    assert starts[0] < starts[1] < title
    runs = _runs_in_store(project, multirun)  # the two jobs' runs, and the hint once, after the table
    assert len(runs) == 2 == len(set(runs))
    job_runs = [RUN_LINE.search("\n".join(lines[a:b])).group(2) for a, b in zip(starts, [starts[1], title])]
    assert job_runs == runs
    assert "(best epoch 1 of 1)" in lines[starts[0] + 1] and "of 2)" in lines[starts[1] + 1]  # counted from 1

    header, *rows = lines[title + 1: title + 4]
    assert header.split() == ["job", "overrides", "val/acc", "test/acc", "run"]
    for i, row in enumerate(rows):
        job, override, val, test, run_id = row.split()
        metrics = dict(kv.split("=") for kv in lines[starts[i] + 1].split("(")[0].split())
        assert (job, override, run_id) == (str(i), f"trainer.max_epochs={i + 1}", runs[i])
        assert (val, test) == (metrics["val/acc"], metrics["test/acc"])
    assert lines[title + 4] == ui_hint(f"sqlite:///{project / 'mlflow.db'}")


def test_the_evaluate_stage_prints_the_lines_of_its_command(project, multirun):
    """The DVC evaluate stage on job 0's outputs says what `pipeline train` said of them: its
    test metrics, the outputs folder and the run (the train run, which evaluate joins)."""
    lines = multirun.splitlines()
    start = lines.index("[job 0] trainer.max_epochs=1")
    metrics, outputs, run = lines[start + 1: start + 4]
    job_dir = Path(outputs.removeprefix("outputs: "))
    params = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    params.paths.out_dir = str(job_dir)
    OmegaConf.save(params, project / "params.yaml", resolve=True)

    out = _run(project, [sys.executable, "-m", "pipeline.cli.stages", "evaluate", "params.yaml"])
    test_only = "  ".join(kv for kv in metrics.split("  ") if kv.startswith("test/"))
    assert out.splitlines() == [test_only, outputs, run, ui_hint(f"sqlite:///{project / 'mlflow.db'}")]


def test_cv_compare_report_and_tune_end_with_their_run(project, multirun):
    """Each command's last lines name the run it made (a sweep: its parent run) and link to it."""
    cv = _pipeline(project, "cv", "trainer.max_epochs=1")
    assert cv.splitlines()[-3].startswith("outputs: ") and _runs_in_store(project, cv)

    compare = _pipeline(project, "compare", "trainer.max_epochs=1")
    assert compare.splitlines()[-3].endswith("reports/compare.md") and _runs_in_store(project, compare)

    trained = RUN_LINE.findall(multirun)[1][1]
    report = _pipeline(project, "report", f"run_id={trained}")
    assert report.splitlines()[-3].endswith(f"runs/{trained}/report.html")
    assert _runs_in_store(project, report) == [trained]  # the run reported on, not a new one

    tune = _pipeline(project, "tune", "tune.num_samples=1", "tune.max_epochs=1", "tune.scheduler=fifo")
    assert tune.splitlines()[-3].endswith("results/tune")
    [(label, _, _)] = RUN_LINE.findall(tune)
    assert label == "sweep run" and _runs_in_store(project, tune)


def test_a_server_run_links_to_the_server():
    assert run_url("https://mlflow.example.org/", "7", "ab12") == "https://mlflow.example.org/#/experiments/7/runs/ab12"
    assert ui_hint("https://mlflow.example.org") is None  # a server serves its own UI
