"""Fault scenario 1 with SIGKILL: a training process that cannot clean up after itself.

`pipeline train` is killed with SIGKILL mid-training: its MLflow run stays RUNNING until the
next command on the store marks it KILLED (the writer is gone: `pipeline.tracking.liveness`),
its `last.ckpt` loads, and `trainer.resume_from` continues it to the very curve an
uninterrupted run with the same seed draws. The SIGTERM and SIGINT cases, and `dvc repro`
killed, are in test_signals.py.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.models.checkpoints import load_file
from pipeline.tasks.data import ensure_data
from pipeline.tasks.train import train
from pipeline.tracking.liveness import ENDED_TAG, GONE, PID_TAG
from pipeline.training.network import load_network
from procs import project_env

EPOCHS = 30  # a few seconds of training: the kill lands well before the end
# Dropout and augmentation draw random numbers every batch: the resumed run must draw the same.
RUN = ["model=mlp", "model.dropout=0.2", "regularizer.augment.translate=0.1", f"trainer.max_epochs={EPOCHS}",
       "regularizer.early_stopping.enabled=false", "trainer.enable_progress_bar=false", "tune.use_best=false"]
CURVES = ("train/loss", "val/loss", "val/acc")


def _rows(db: Path, sql: str, *args: object) -> list[tuple]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(sql, args).fetchall()
    except sqlite3.Error:  # not created yet, or being written
        return []


def _runs(db: Path) -> dict[str, dict]:
    """Each run's status, end time and tags, by run id."""
    runs = {rid: {"status": status, "end_time": end, "tags": {}}
            for rid, status, end in _rows(db, "SELECT run_uuid, status, end_time FROM runs")}
    for rid, key, value in _rows(db, "SELECT run_uuid, key, value FROM tags"):
        runs[rid]["tags"][key] = value
    return runs


def _curve(db: Path, run_id: str) -> dict[tuple[str, int], float]:
    keys = ",".join(f"'{k}'" for k in CURVES)
    return {(key, step): value for key, step, value in _rows(
        db, f"SELECT key, step, value FROM metrics WHERE run_uuid = ? AND key IN ({keys})", run_id)}


def _train(folder: Path, *overrides: str) -> subprocess.Popen:
    folder.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", *RUN, *overrides], cwd=folder,
                            env=project_env(), stdout=(folder / "train.log").open("a"), stderr=subprocess.STDOUT)


def _log(folder: Path) -> str:
    return (folder / "train.log").read_text()[-3000:]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.fault("1. Training process killed", fault="SIGKILL mid-epoch to `pipeline train`, then "
                   "`trainer.resume_from=<its last.ckpt>`",
                   expected="exit 137; the next command marks the run KILLED (process gone); last.ckpt loads; "
                            "the resumed run's curve equals an uninterrupted run's, exactly")
def test_pipeline_train_killed_then_resumed(tmp_path: Path, observe):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    db = killed / "mlflow.db"
    # The uninterrupted run trains alongside: its curve is the reference.
    reference = _train(straight)
    proc = _train(killed)
    try:
        deadline = time.monotonic() + 300
        while not (list(killed.glob("outputs/*/*/models/last.ckpt")) and _rows(
                db, "SELECT COUNT(*) FROM metrics WHERE key = 'val/acc'")[0][0] >= 2):
            assert proc.poll() is None, f"exited {proc.returncode} before two epochs:\n{_log(killed)}"
            assert time.monotonic() < deadline, _log(killed)
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        status = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert status == -signal.SIGKILL
    [(killed_id, left)] = [(rid, r["status"]) for rid, r in _runs(db).items()]
    assert left == "RUNNING"  # nothing ran on the way out
    epochs_before = len({step for (_, step) in _curve(db, killed_id)})
    assert epochs_before < EPOCHS, "the kill came after training: lengthen EPOCHS"

    # last.ckpt loads, weights-only, as a model and as a training state.
    [run_dir] = killed.glob("outputs/*/*")
    last = run_dir / "models" / "last.ckpt"
    saved = load_file(last)
    load_network(last)
    resume_epoch = saved["epoch"] + 1
    assert [r["epoch"] for r in saved["callbacks"]["EpochRecorder"]["rows"]] == list(range(resume_epoch))

    # The next command on the store (here: the resume) marks the killed run.
    resumed = _train(killed, f"trainer.resume_from={last}")
    assert resumed.wait(timeout=600) == 0, _log(killed)
    assert reference.wait(timeout=600) == 0, _log(straight)
    runs = _runs(db)
    gone = runs[killed_id]
    assert gone["status"] == "KILLED" and gone["tags"][ENDED_TAG] == GONE and gone["end_time"]
    assert gone["tags"][PID_TAG] == str(proc.pid)
    [resumed_id] = set(runs) - {killed_id}
    assert runs[resumed_id]["status"] == "FINISHED"
    assert runs[resumed_id]["tags"]["resumed_from"] == str(last)

    # The resumed run's curve (the checkpoint's epochs, logged again, and the rest) is the
    # uninterrupted run's, bit for bit; so is what the killed run logged before it died.
    [(straight_id,)] = _rows(straight / "mlflow.db", "SELECT run_uuid FROM runs")
    expected = _curve(straight / "mlflow.db", straight_id)
    got = _curve(db, resumed_id)
    before = _curve(db, killed_id)
    assert len(expected) == len(CURVES) * EPOCHS
    assert got == expected
    assert before == {k: expected[k] for k in before}
    [resumed_dir] = set(killed.glob("outputs/*/*")) - {run_dir}
    curves_file = json.loads((resumed_dir / "plots" / "train_curves.json").read_text())
    assert [r["epoch"] for r in curves_file] == list(range(EPOCHS))
    # The same best epoch, and best.ckpt the same model: the same test figures.
    [straight_dir] = straight.glob("outputs/*/*")

    def summary(folder: Path, name: str) -> dict:
        return {k: v for k, v in json.loads((folder / "metrics" / name).read_text()).items() if not k.startswith("time_")}

    assert summary(resumed_dir, "train.json") == summary(straight_dir, "train.json")
    assert summary(resumed_dir, "test.json") == summary(straight_dir, "test.json")

    outputs = ["models/best.ckpt", "models/last.ckpt", "metrics/train.json", "metrics/test.json",
               "plots/train_curves.json"]
    observe.saw(f"exit {128 + signal.SIGKILL}; run RUNNING until the next command, then KILLED "
                f"({ENDED_TAG}={gone['tags'][ENDED_TAG]})")
    observe.saw(f"last.ckpt (epoch {saved['epoch']}) loaded; resumed at epoch {resume_epoch}: "
                f"{len(got)}/{len(expected)} curve points equal to the uninterrupted run's")
    lost = observe.lost(
        runs=sum(r["status"] == "RUNNING" for r in runs.values()),
        metrics=len(set(expected) - set(got)) + sum(got.get(k) != v for k, v in expected.items() if k in got),
        checkpoints=0,  # loaded above: a failed load fails the test
        outputs=sum(not (resumed_dir / rel).exists() for rel in outputs))
    assert lost == {"runs": 0, "metrics": 0, "checkpoints": 0, "outputs": 0}


def test_resume_from_a_missing_file_is_a_user_error(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "pipeline", "train", *RUN, "trainer.resume_from=nosuch.ckpt"],
                          cwd=tmp_path, env=project_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "trainer.resume_from='nosuch.ckpt': no such file" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "outputs").exists()  # nothing half-written


def _state_dict(path: Path) -> None:
    torch.save({"weight": torch.zeros(2)}, path)


@pytest.mark.parametrize("write, said", [
    (lambda p: p.write_text("not a checkpoint"), "is not a PyTorch state dict or checkpoint"),
    (_state_dict, "is not a Lightning training checkpoint"),
], ids=["not-torch", "state-dict"])
def test_resume_from_a_file_that_is_no_training_checkpoint(cfg_factory, tmp_path: Path, write, said: str):
    write(tmp_path / "resume.ckpt")
    cfg = cfg_factory(["model=mlp", f"trainer.resume_from={tmp_path / 'resume.ckpt'}"])
    ensure_data(cfg)
    with pytest.raises(PipelineError, match=said):
        train(cfg)
    assert not (tmp_path / "out" / "models").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.integration
def test_resume_with_another_model_names_both(cfg_factory, tmp_path: Path):
    cfg = cfg_factory(["model=mlp", "model.hidden_sizes=[16]"], epochs=1)
    ensure_data(cfg)
    train(cfg)
    other = tmp_path / "other.ckpt"
    other.write_bytes((tmp_path / "out" / "models" / "last.ckpt").read_bytes())
    with pytest.raises(PipelineError, match=r"holds a mlp .*\[16\].* but this config builds a mlp .*\[32\]"):
        train(cfg_factory(["model=mlp", "model.hidden_sizes=[32]", f"trainer.resume_from={other}"]))


@pytest.mark.parametrize("job, run", [("a sweep", "tune"), ("cross-validation", "cv")])
def test_jobs_of_many_models_refuse_a_resume(cfg_factory, tmp_path: Path, job: str, run: str):
    from pipeline.tasks.cv import cross_validate
    from pipeline.tasks.tune import tune

    (tmp_path / "last.ckpt").write_bytes(b"")
    cfg = cfg_factory(["model=mlp", f"trainer.resume_from={tmp_path / 'last.ckpt'}"])
    with pytest.raises(PipelineError, match=f"{job} trains every model from scratch"):
        {"tune": tune, "cv": cross_validate}[run](cfg)


class _Unsaveable:
    def __reduce__(self):
        raise OSError(28, "No space left on device")


def test_a_checkpoint_write_that_fails_leaves_the_previous_one_whole(tmp_path: Path):
    from pipeline.training.checkpoint_io import AtomicCheckpointIO

    last = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1, "weight": torch.ones(1000)}, last)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"epoch": 2, "weight": torch.ones(1000), "then": _Unsaveable()}, last)
    assert load_file(last)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left beside it
