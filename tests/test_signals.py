"""A stopped run must not look finished: SIGINT exits 130 and SIGTERM 143, the MLflow run ends
KILLED, and nothing that marks completion is written (for train: metrics/train.json, and no
evaluation after it; under DVC: no `train` entry in dvc.lock).

First the three ways Lightning would hide a signal from its caller (in this process, fast),
then real signals to real processes: `python -m pipeline train`, a sweep, and `dvc repro`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

import sweeps
from pipeline.cli import exits
from pipeline.config import compose
from pipeline.errors import Terminated
from pipeline.layout import Layout
from pipeline.tasks.data import ensure_data
from pipeline.tasks.train import train
from pipeline.tuning.stopping import sigterm_interrupts_ray
from pipeline.validation import prepare
from procs import BIN, project_env, start_stage

REPO = Path(__file__).resolve().parents[1]
# Long enough that a run is still training when the signal comes (it stops at once).
LONG = ["model=mlp", "trainer.max_epochs=1000", "regularizer.early_stopping.enabled=false",
        "trainer.enable_progress_bar=false", "tune.use_best=false"]


def _query(db: Path, sql: str, *, writer_gone: bool = False) -> list[tuple]:
    """Read-only while the stage may write; once its writer is gone, read-write: a writer
    killed inside a transaction leaves a hot journal, which only a connection that may write
    rolls back (MLflow's next client does; a read-only one gets SQLITE_READONLY_ROLLBACK)."""
    try:
        with sqlite3.connect(f"file:{db}" + ("" if writer_gone else "?mode=ro"), uri=True, timeout=5) as con:
            return con.execute(sql).fetchall()
    except sqlite3.Error:  # not created yet, or being written
        return []


def _epochs_logged(db: Path) -> int:
    rows = _query(db, "SELECT COUNT(*) FROM metrics WHERE key = 'val/acc'")
    return rows[0][0] if rows else 0


def _run_statuses(db: Path) -> list[str]:
    """The runs' statuses once every process that wrote them has ended."""
    return [status for (status,) in _query(db, "SELECT status FROM runs", writer_gone=True)]


def _wait_for_an_epoch(db: Path, proc: subprocess.Popen, log: Path, timeout: float = 180, *,
                       checkpoint: str | None = None) -> None:
    """Until an epoch is logged (and, with `checkpoint`, a glob from the store's folder, saved:
    the checkpoint follows the epoch's metrics)."""
    deadline = time.monotonic() + timeout
    while _epochs_logged(db) < 1 or (checkpoint and not list(db.parent.glob(checkpoint))):
        assert proc.poll() is None, f"exited {proc.returncode} before an epoch:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


# ---------------------------------------------------------------------------- in this process

def _in_a_ray_block(body) -> int:
    """`body` where a driver waits on Ray, under the CLI's exit statuses."""
    def wrapped() -> None:
        with sigterm_interrupts_ray():
            body()

    return exits.run(wrapped)


@pytest.mark.parametrize("run", [exits.run, _in_a_ray_block], ids=["cli", "ray-block"])
def test_a_second_sigterm_does_not_cut_the_cleanup_short(run):
    cleaned = []

    def body() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises long before this ends
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler again, or the DVC watch
            time.sleep(0.1)
            cleaned.append("done")

    assert run(body) == exits.TERMINATED and cleaned == ["done"]


class SignalAt(Callback):
    """Sends `signum` to this process at the end of epoch 1, or when training ends."""

    def __init__(self, signum: int, hook: str) -> None:
        self.signum, self.hook = signum, hook

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.hook == "epoch" and trainer.current_epoch == 1:
            os.kill(os.getpid(), self.signum)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.hook == "end":
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the cases below: creating one costs seconds of schema migrations."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.mark.integration
@pytest.mark.parametrize("signum, hook, raised", [
    (signal.SIGINT, "epoch", KeyboardInterrupt),  # Lightning: sys.exit(1)
    (signal.SIGTERM, "epoch", Terminated),        # Lightning: SIGTERMException, a SystemExit of status 0
    (signal.SIGTERM, "end", Terminated),          # Lightning: fit returns as if training had ended
])
def test_train_raises_the_signal_lightning_caught(cfg_factory, store: str, signum, hook, raised):
    cfg = cfg_factory(["model=mlp", f"tracking.tracking_uri={store}"], epochs=5)
    ensure_data(cfg)
    # As for a library caller: Python's own handlers, whatever an earlier test's Ray left, so
    # that Lightning's are the only ones in play.
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    sigterm = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(raised):
            train(cfg, callbacks=[SignalAt(signum, hook)])
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after catching one
        signal.signal(signal.SIGTERM, sigterm)
    layout = Layout.from_cfg(prepare(cfg))
    assert not (layout.metrics / "train.json").exists()
    run_id = json.loads(layout.run_file.read_text())["run_id"]
    assert _query(Path(store.removeprefix("sqlite:///")),
                  f"SELECT status FROM runs WHERE run_uuid = '{run_id}'") == [("KILLED",)]


def test_a_stop_signal_waits_for_the_store_write_under_way():
    """SIGTERM in the middle of a store call reaches its handler only once the call is over:
    raised inside a SQLite write, it left the write lock held by this very process."""
    from pipeline.tracking.mlflow_run import signals_deferred

    order: list[str] = []

    def handler(signum, frame):
        order.append("handler")
        raise Terminated("terminated")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(Terminated):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # bytecode boundaries where a handler would run
                    order.append("writing") if not order else None
                order.append("written")
        assert order == ["writing", "written", "handler"]
        assert signal.getsignal(signal.SIGTERM) is handler  # put back as it was
    finally:
        signal.signal(signal.SIGTERM, previous)



LEAVING = """
import atexit, sys, threading, time, tempfile
from pathlib import Path
from pipeline.cli import exits

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
folder = tempfile.TemporaryDirectory()  # its finalizer removes it at exit
(out / "tmp").write_text(folder.name)
if sys.argv[2] == "thread":  # a non-daemon thread still working: the exit waits for it
    threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("done"))).start()
sys.stdout.write("unflushed output")
exits.leave(int(sys.argv[3]))
"""


@pytest.mark.parametrize("thread, status", [("none", 0), ("none", 143), ("thread", 2)])
def test_leave_keeps_what_a_normal_exit_does(tmp_path: Path, thread: str, status: int):
    """`exits.leave` skips the interpreter's teardown only: the status, the atexit handlers,
    temporary folders' finalizers, buffered output and a non-daemon thread's end survive."""
    done = subprocess.run([sys.executable, "-c", LEAVING, str(tmp_path), thread, str(status)],
                          capture_output=True, text=True, env=project_env(), timeout=60)
    assert done.returncode == status, done.stderr
    assert done.stdout == "unflushed output"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not Path((tmp_path / "tmp").read_text()).exists()
    assert (tmp_path / "thread").exists() == (thread == "thread")


def test_leave_lets_a_profiler_write_its_results(tmp_path: Path):
    """Under cProfile (which writes its file after the program returns) the exit is a normal one."""
    script = tmp_path / "leaving.py"
    script.write_text(LEAVING)
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(tmp_path / "run.prof"), str(script),
                           str(tmp_path), "none", "3"], capture_output=True, text=True, env=project_env(), timeout=60)
    assert done.returncode == 0, done.stderr  # cProfile's own: it swallows SystemExit
    assert (tmp_path / "run.prof").stat().st_size > 0 and (tmp_path / "atexit").read_text() == "ran"

# ---------------------------------------------------------------------------- real processes

def _stopped_train(signum: int, status: int) -> pytest.MarkDecorator:
    name = signal.Signals(signum).name
    return pytest.mark.fault("1. Training process killed", fault=f"{name} mid-epoch to `pipeline train`",
                             expected=f"exit {status}; run KILLED; last.ckpt loadable; no completion marks "
                                      "(train.json, test.json, summary)")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("signum, status, said", [
    pytest.param(signal.SIGTERM, 143, "terminated", marks=_stopped_train(signal.SIGTERM, 143)),
    pytest.param(signal.SIGINT, 130, "interrupted", marks=_stopped_train(signal.SIGINT, 130)),
])
def test_pipeline_train_stopped_mid_training(tmp_path: Path, signum: int, status: int, said: str, observe):
    from pipeline.training.network import load_network

    log = tmp_path / "train.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", *LONG], cwd=tmp_path, env=project_env(),
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for_an_epoch(tmp_path / "mlflow.db", proc, log, checkpoint="outputs/*/*/models/last.ckpt")
            proc.send_signal(signum)
            exit_status = proc.wait(timeout=60)
            assert exit_status == status, log.read_text()[-3000:]
        finally:
            proc.kill()
    assert said in log.read_text()
    statuses = _run_statuses(tmp_path / "mlflow.db")
    assert statuses == ["KILLED"]
    [run_dir] = (tmp_path / "outputs").glob("*/*")
    last = run_dir / "models" / "last.ckpt"
    # Progress, kept (not a mark of completion), and whole: it loads as a model, and holds the
    # curve up to its epoch, every point of which reached the store.
    load_network(last)
    rows = torch.load(last, map_location="cpu", weights_only=True)["callbacks"]["EpochRecorder"]["rows"]
    logged = {step for (step,) in _query(tmp_path / "mlflow.db", "SELECT step FROM metrics WHERE key = 'val/acc'")}
    assert not list(run_dir.rglob("train.json")) and not list(run_dir.rglob("test.json"))
    assert "best trial" not in log.read_text()  # no summary printed either
    # The run's own log says how it ended, in its folder and among the run's artifacts.
    assert "Ended by" in (run_dir / "run.log").read_text()
    assert [p.name for p in (tmp_path / "mlartifacts").rglob("run.log")] == ["run.log"]
    observe.saw(f"exit {exit_status}, run {statuses[0]}; last.ckpt (epoch {rows[-1]['epoch']}) loaded; "
                f"{len(logged)} epoch(s) in MLflow")
    lost = observe.lost(runs=statuses.count("RUNNING"),
                        metrics=len({r["epoch"] for r in rows} - logged),
                        outputs=sum(not (run_dir / "models" / f).exists() for f in ("config.yaml", "run.json")))
    assert lost == {"runs": 0, "metrics": 0, "checkpoints": 0, "outputs": 0}


@pytest.mark.integration
@pytest.mark.slow
def test_sweep_terminated_ends_as_interrupted(cfg_factory, tmp_path: Path):
    """SIGTERM to the driver of a sweep stops it as Ctrl+C does (saved to resume), but exits 143."""
    from ray.tune import Tuner

    cfg = cfg_factory(["model=mlp", "tune.num_cpus=2", "tune.max_concurrent_trials=2", "tune.num_samples=4",
                       "tune.scheduler=fifo", "tune.max_epochs=500"])
    ensure_data(cfg)
    log = tmp_path / "stage.log"
    with log.open("w") as out:
        proc = start_stage("tune", cfg, tmp_path, out)
        try:
            _wait_for_an_epoch(tmp_path / "mlflow.db", proc, log)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
        finally:
            proc.kill()
    assert "continue it with tune.resume=true" in log.read_text()
    _, parent, children = sweeps.tree(tmp_path)
    assert parent.info.status == "KILLED" and parent.data.tags.get("interrupted") == "true"
    assert children and all(c.info.status == "KILLED" for c in children)
    assert not (tmp_path / "out/results/tune/best.yaml").exists()
    assert Tuner.can_restore(parent.data.tags["ray_experiment"])


# ---------------------------------------------------------------------------- dvc repro

def _dvc_project(dest: Path) -> Path:
    """A git repository with the real fetch, split and train stages and a params.yaml composed
    for a long MLP run. Their code deps are left out (this test is about signals, not about
    which files a stage reads), and so is train's dependency on the tune stage, which would
    run a sweep first."""
    for rel in (".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore"):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes((REPO / rel).read_bytes())
    subprocess.run(["cp", "-r", str(REPO / "conf"), str(dest / "conf")], check=True)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    kept = {name: stages[name] for name in ("fetch", "split", "train")}
    for stage in kept.values():
        stage["deps"] = [d for d in stage["deps"] if d.startswith("data/")]
    (dest / "dvc.yaml").write_text(yaml.safe_dump({"stages": kept}, sort_keys=False))
    OmegaConf.save(compose(LONG, conf=dest / "conf"), dest / "params.yaml", resolve=True)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
        subprocess.run(cmd, cwd=dest, env=project_env(), check=True, capture_output=True)
    return dest


def _dvc_fault(scenario: str, fault: str, expected: str) -> pytest.MarkDecorator:
    return pytest.mark.fault(scenario, fault=fault, expected=expected)


_REPRO_AGAIN = ("the next `dvc repro` reuses fetch and split and completes; dvc.lock untouched until then; "
                "no lock left that blocks it")


@pytest.mark.integration
@pytest.mark.slow
# DVC runs a stage through $SHELL, or /bin/sh when it is unset (as on CI): bash replaces itself
# by the command, while dash stays between DVC and the stage, so the stage's parent outlives DVC.
# "dvc": the signal to DVC alone, as `kill` or `timeout` send it: DVC dies without passing it on,
# and the stage must notice. "stage": SIGKILL to the train stage's process (the OOM killer).
@pytest.mark.parametrize("signum, target, shell", [
    pytest.param(signal.SIGTERM, "dvc", "/bin/sh", marks=_dvc_fault(
        "2. `dvc repro` killed", "SIGTERM to `dvc repro` during train",
        f"the train stage ends too, its run KILLED; {_REPRO_AGAIN}"), id="SIGTERM-dvc-sh"),
    pytest.param(signal.SIGTERM, "dvc", "/bin/bash", id="SIGTERM-dvc-bash"),
    pytest.param(signal.SIGKILL, "dvc", "/bin/sh", marks=_dvc_fault(
        "2. `dvc repro` killed", "SIGKILL to `dvc repro` during train",
        f"the train stage ends too, its run KILLED; {_REPRO_AGAIN}"), id="SIGKILL-dvc-sh"),
    pytest.param(signal.SIGKILL, "stage", "/bin/sh", marks=_dvc_fault(
        "1. Training process killed", "SIGKILL mid-epoch to the `train` DVC stage",
        f"dvc repro fails; the next command marks the run KILLED (process gone); last.ckpt loadable; "
        f"{_REPRO_AGAIN}"), id="SIGKILL-stage-sh"),
])
def test_dvc_repro_stopped_during_train_records_nothing(tmp_path: Path, signum: int, target: str, shell: str,
                                                        observe):
    import psutil

    from pipeline.tracking.liveness import ENDED_TAG, GONE
    from pipeline.training.network import load_network

    project = _dvc_project(tmp_path / "project")
    db = project / "mlflow.db"
    log = tmp_path / "repro.log"
    with log.open("w") as out:
        dvc = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=project, env={**project_env(), "SHELL": shell},
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_an_epoch(db, dvc, log, checkpoint="models/last.ckpt")
            stage = psutil.Process(dvc.pid).children(recursive=True)
            locked = (project / "dvc.lock").read_bytes()  # fetch and split, recorded before train began
            finished = {p: p.stat().st_mtime_ns for p in (project / "data").rglob("*") if p.is_file()}
            if target == "dvc":
                dvc.send_signal(signum)
                assert dvc.wait(timeout=60) != 0
            else:
                [trainer] = [p for p in stage if "pipeline.cli.stages" in p.cmdline()]  # not the shell around it
                trainer.send_signal(signum)
                assert dvc.wait(timeout=120) != 0, log.read_text()[-3000:]
            gone, alive = psutil.wait_procs(stage, timeout=30)
            assert not alive, f"the train stage outlived DVC: {alive}"
        finally:
            with contextlib.suppress(ProcessLookupError):  # DVC's group: the stage, if it outlived DVC
                os.killpg(dvc.pid, signal.SIGKILL)
    assert "Running stage 'train'" in log.read_text()
    left = _run_statuses(db)
    # The stage ends its own run when it can; after SIGKILL only the next command can.
    assert left == (["RUNNING"] if target == "stage" else ["KILLED"])
    assert not (project / "metrics" / "train.json").exists()
    assert (project / "dvc.lock").read_bytes() == locked
    lock = yaml.safe_load(locked)["stages"]
    assert "train" not in lock and {"fetch", "split"} <= set(lock)
    load_network(project / "models" / "last.ckpt")
    # DVC's own record of who holds what (its pid and command, per path): a killed DVC leaves
    # its entries, which the next DVC drops once it sees that pid gone.
    rwlock = project / ".dvc" / "tmp" / "rwlock"
    holders = {info["pid"] for infos in json.loads(rwlock.read_text() or "{}").get("write", {}).values()
               for info in (infos if isinstance(infos, list) else [infos])} if rwlock.exists() else set()
    stale = dvc.pid in holders

    # Nothing left behind blocks DVC: status reads, and repro runs the train stage again.
    def dvc_ok(*args: str) -> str:
        done = subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=project_env(), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    assert "train" in dvc_ok("status")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["trainer"]["max_epochs"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = dvc_ok("repro")
    assert "Stage 'fetch' didn't change, skipping" in again and "Stage 'split' didn't change, skipping" in again
    if stale:
        assert "had been killed. Auto removed it from the lock file." in again
    rerun = [p for p, mtime in finished.items() if not p.exists() or p.stat().st_mtime_ns != mtime]
    assert not rerun
    assert "train" in yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    runs = _query(db, "SELECT r.status, t.value FROM runs r LEFT JOIN tags t ON t.run_uuid = r.run_uuid "
                      f"AND t.key = '{ENDED_TAG}' ORDER BY r.start_time")
    assert runs == [("KILLED", GONE if target == "stage" else None), ("FINISHED", None)]
    code = 128 - dvc.returncode if dvc.returncode < 0 else dvc.returncode
    observe.saw(f"dvc repro exit {code}; run {left[0]} after the fault, {runs[0][0]} after the next repro"
                + (f" ({ENDED_TAG}={GONE})" if runs[0][1] else ""))
    observe.saw("dvc.lock untouched; last.ckpt loaded; " + ("DVC's stale rwlock entry dropped by the next DVC; "
                                                            if stale else "no stale rwlock entry; ")
                + "fetch and split reused")
    lost = observe.lost(runs=sum(status == "RUNNING" for status, _ in runs), outputs=len(rerun))
    assert lost == {"runs": 0, "metrics": 0, "checkpoints": 0, "outputs": 0}
