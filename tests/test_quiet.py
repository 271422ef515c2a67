"""What a user reads: one line per event, progress where work is long, and `-v` for everything."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from procs import BIN, project_env

REPO = Path(__file__).resolve().parents[1]
HEADER = "GPU available:"

# Lightning fits' worth of logging (Trainer() logs the accelerator header), with `mlflow.pytorch`
# imported between them as the pipeline imports it (logging a model, loading one); then the
# same after the switch that `pipeline -v` sets. Markers on stderr, where the libraries log.
FITS = """
import logging, os, sys
import lightning as L
from pipeline.quiet import import_mlflow_pytorch, quiet

def fit():
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    # What mlflow.pytorch.log_model logs for every model the evaluate stage logs (pickled on purpose).
    logging.getLogger("mlflow.pytorch").warning("Saving pytorch model by Pickle or CloudPickle format requires ...")

quiet()
fit()
import_mlflow_pytorch()
fit()
logging.getLogger("pipeline.probe").warning("after the model")
print("root handlers:", logging.getLogger().handlers, file=sys.stderr)
print("-- verbose --", file=sys.stderr)
os.environ["PIPELINE_VERBOSE"] = "1"
quiet()
fit()
"""


def test_header_once_logging_unchanged_by_mlflow_pytorch_and_everything_when_verbose():
    proc = subprocess.run([sys.executable, "-c", FITS], cwd=REPO, env={**project_env(), "PIPELINE_VERBOSE": ""},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    quiet, _, verbose = proc.stdout.partition("-- verbose --")
    assert quiet.count(HEADER) == 1, proc.stdout  # two fits, one header
    # mlflow.pytorch's import-time logging.basicConfig is undone: no root handler, no
    # `INFO:pytorch_lightning...` lines, and Lightning's lines still pass quiet's filter.
    assert "root handlers: []" in quiet and "INFO:" not in proc.stdout, proc.stdout
    assert quiet.count("after the model") == 1, proc.stdout  # Python's last-resort handler, once
    assert "💡" not in quiet and "Saving pytorch model by Pickle" not in quiet, proc.stdout
    assert HEADER in verbose and "💡" in verbose, proc.stdout  # -v: everything back, advertising too
    assert "Saving pytorch model by Pickle" in verbose, proc.stdout


def test_the_verbose_switch_reaches_the_environment(monkeypatch, capsys):
    from pipeline.cli.main import main
    from pipeline.quiet import VERBOSE_ENV, quiet, verbose

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    try:
        assert main(["-v", "deps", "--check"]) == 0
        assert os.environ[VERBOSE_ENV] == "1" and verbose()
    finally:
        monkeypatch.delenv(VERBOSE_ENV, raising=False)
        quiet()  # the rest of the session quiet again
    with pytest.raises(SystemExit) as stop:  # a switch alone is no command: argparse's usage error
        main(["--verbose"])
    assert stop.value.code == 2


@pytest.mark.slow
@pytest.mark.integration
def test_a_real_two_fold_cv_prints_each_thing_once(tmp_path):
    """`pipeline cv` with 2 folds, as a user runs it: Lightning's header at most once, none of
    MLflow's bookkeeping lines, Lightning's internals or advertising; the results at the end."""
    cmd = [str(BIN / "pipeline"), "cv", "model=mlp", "data.split.folds=2", "trainer.max_epochs=1",
           "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
           f"paths.root={tmp_path}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**project_env(), "PIPELINE_VERBOSE": ""}, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count(HEADER) <= 1, out
    for noise in ("Creating initial MLflow database tables", "system_metrics", "estimate number of stepping batches",
                  "💡", "Downloading artifacts", "Started a local Ray instance"):
        assert noise not in out, f"{noise!r} in:\n{out}"
    # No line in the format of `logging.basicConfig` (`INFO:name:message`), which MLflow's import set.
    assert not re.search(r"^(INFO|WARNING):\S", out, re.M), out
    assert "val/acc:" in out and "test/acc:" in out, out
    # The folds ran side by side (cv.parallel=auto, two cores), each saying when it ended.
    assert sorted(re.findall(r"^INFO: fold (\d) done \(\d/2, \d+ s\): val/acc=", out, re.M)) == ["0", "1"], out
