"""The real pipeline: `dvc repro` in a temporary git repository holding this working tree."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from procs import BIN, git_project, project_env

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run(cmd: list[str], cwd: Path) -> str:
    """`cmd`'s console as a user sees it: stdout and stderr in the order they were written."""
    result = subprocess.run(cmd, cwd=cwd, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}"
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh git repository with the project's tracked (and new, not ignored) files."""
    return git_project(tmp_path_factory.mktemp("project"))


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _stages_run(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


def test_exp_run_on_a_fresh_clone_says_nothing_about_missing_outputs(project, tmp_path):
    """With dvc.lock committed, `dvc exp run` knows every output's hash: before it runs the
    stages, its checkout finds them in no cache and moves on silently; without it, a warning
    per output ("No file hash info found ... It won't be created") and "Generating lock file".
    (The cheapest stage only; the checkout treats its outputs as a whole run's.)"""
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert (clone / "dvc.lock").exists()
    out = run([str(BIN / "dvc"), "exp", "run", "fetch"], clone)
    assert _stages_run(out) == {"fetch"}, out
    assert "No file hash info" not in out and "Generating lock file" not in out, out
    assert "WARNING" not in out, out


@pytest.fixture(scope="module")
def first_repro(project: Path) -> str:
    return run([str(BIN / "dvc"), "repro"], project)


def test_repro_runs_every_stage_and_writes_outputs(project, first_repro):
    assert _stages_run(first_repro) == set(STAGES)
    manifest = json.loads((project / "data/raw/digits/manifest.json").read_text())
    assert manifest["image_shape"] == [8, 8, 1] and manifest["num_samples"] == 1797
    for rel in ("data/splits/digits/split.json", "models/best.ckpt", "models/last.ckpt", "metrics/train.json",
                "plots/train_curves.json", "plots/confusion.json", "plots/confusion.png", "plots/learning_curves.png"):
        assert (project / rel).exists(), rel
    test = json.loads((project / "metrics/test.json").read_text())
    assert test["test_acc"] >= 0.97, test  # the defaults' promise on digits
    assert (project / "mlflow.db").exists()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout
    # Outputs are ignored: only the lock changes (staged, as core.autostage says).
    assert {line[3:] for line in status.splitlines()} <= {"dvc.lock"}, status
    assert not (project / "models/evolution").exists()  # report.evolution_epochs=[] by default: nothing kept


# What each stage prints when it ends, as its command does (pipeline.cli.summaries): a line of
# its own, then its MLflow run (a sweep's parent run for tune) as id and UI link.
STAGE_ENDS = {"tune": "best: ", "train": "(best epoch ", "evaluate": "test/acc=", "cv": "val/acc: ",
              "compare": "report: ", "report": "report: "}
RUN_LINK = re.compile(r"^(?:sweep )?run: ([0-9a-f]{32})  http://127\.0\.0\.1:5000/#/experiments/\d+/runs/\1$", re.M)


def test_repro_stages_end_with_their_summary_and_run_and_say_things_once(project, first_repro):
    sections = re.split(r"^Running stage '(\w+)':$", first_repro, flags=re.M)[1:]
    by_stage = dict(zip(sections[::2], sections[1::2]))
    assert set(by_stage) == set(STAGES)
    for stage, marker in STAGE_ENDS.items():
        text = by_stage[stage]
        assert marker in text and RUN_LINK.search(text), f"{stage}:\n{text[-2000:]}"
        assert text.count("GPU available:") <= 1, text  # Lightning's header: once per process at most
    assert "No file hash info" not in first_repro and "Saving pytorch model by Pickle" not in first_repro
    assert "💡" not in first_repro and "Downloading artifacts" not in first_repro
    # No line in `logging.basicConfig`'s format (`INFO:name:message`); the progress lines are ours.
    assert not re.search(r"^(INFO|WARNING):\S", first_repro, re.M), first_repro[-3000:]
    # The folds ran side by side (cv.parallel=auto on two cores), each saying when it ended:
    # the cv stage's 5, and the comparison's 5 per alternative, named.
    folds = r"fold (\d) done \((\d)/5, \d+ s\): val/acc=\S+  test/acc="
    for stage, prefix in (("cv", ""), ("compare", "mlp: "), ("compare", "lenet5: ")):
        found = re.findall(rf"^INFO: {prefix}{folds}", by_stage[stage], re.M)
        assert sorted(f for f, _ in found) == list("01234") and [n for _, n in found] == list("12345"), \
            by_stage[stage]


def test_train_tagged_with_dvc_split_hash(project, first_repro):
    from mlflow.tracking import MlflowClient

    lock = yaml.safe_load((project / "dvc.lock").read_text())
    split_md5 = next(o["md5"] for o in lock["stages"]["split"]["outs"] if o["path"] == "data/splits/digits")
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    run_info = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_id)
    assert run_info.data.tags["dvc_split_md5"] == split_md5
    assert run_info.data.tags["git_commit"]
    assert run_info.info.status == "FINISHED"
    assert run_info.data.metrics["test/acc"] >= 0.97


def test_second_repro_is_a_noop(project, first_repro):
    out = run([str(BIN / "dvc"), "repro"], project)
    assert _stages_run(out) == set()
    assert "up to date" in out.lower()


def _metrics_by_file(project: Path) -> dict[str, dict]:
    """`dvc metrics show --json` of the workspace: {file: its metrics}."""
    done = subprocess.run([str(BIN / "dvc"), "metrics", "show", "--json"], cwd=project, env=project_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (workspace,) = json.loads(done.stdout).values()  # one revision: the workspace
    return {path: found.get("data", found) for path, found in workspace["data"].items()}


def test_metrics_and_plots_show(project, first_repro):
    out = run([str(BIN / "dvc"), "metrics", "show"], project)
    assert "test_acc" in out and "val_acc" in out
    # One key per quantity across the metrics files: the same spelling (`model_macs`) in each.
    files = _metrics_by_file(project)
    assert set(files) == {"metrics/train.json", "metrics/test.json", "metrics/cv.json"}, files
    train, cv = files["metrics/train.json"], files["metrics/cv.json"]
    assert train["model_macs"] == cv["model_macs"] and train["model_params"] == cv["model_params"]
    assert "test_acc" in files["metrics/test.json"] and "val_acc" in train and "mean" in cv["val_acc"]
    for data in files.values():
        assert not {"model", "test", "val", "train", "time"} & set(data), data  # no nested spelling
    run([str(BIN / "dvc"), "plots", "show", "-o", "dvc_plots"], project)
    html = (project / "dvc_plots" / "index.html").read_text()
    assert "train_curves.json" in html and "confusion" in html
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout
    assert "dvc_plots" not in status  # ignored, as every output is


def test_exp_run_model_change_reruns_training_but_not_the_data_stages(project, first_repro):
    """A config-group change through `-S` reruns the model's stages from the sweep on and
    reuses the data stages. (Up to evaluate: cv, compare and report, whose params in dvc.yaml
    include the model, would rerun too, about two and a half minutes more here.)"""
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "lock"], project)
    out = run([str(BIN / "dvc"), "exp", "run", "-S", "model=lenet5", "-S", "trainer.max_epochs=3", "evaluate"],
              project)
    ran = _stages_run(out)
    assert ran == {"tune", "train", "evaluate"}, out
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["model"]["name"] == "lenet5" and params["model"]["activation"] == "tanh"
    config = yaml.safe_load((project / "models/config.yaml").read_text())
    assert config["model"]["name"] == "lenet5"
    shown = run([str(BIN / "dvc"), "exp", "show", "--no-pager", "--md"], project)
    assert "lenet5" in shown
