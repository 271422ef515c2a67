"""Fault scenarios of sweeps (issue #13): the driver of a sweep killed by SIGKILL, then the same
command with `tune.resume=true` (3), and a seeded sweep run twice (8).

Both compare with one uninterrupted reference sweep of the same config and seed (a random
search, so the resumed searcher must also draw the same configs). Trials are the MLP without
dropout: a trial resumed from a checkpoint then trains bit for bit as an uninterrupted one
would (dropout masks come from the global RNG, which a resumed trial seeds afresh).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

import sweeps
from conftest import make_cfg
from pipeline.tasks.data import ensure_data
from pipeline.tasks.tune import tune
from pipeline.training.metrics import EPOCH_METRICS
from procs import project_env
from test_signals import _run_statuses, _wait_for_an_epoch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS, TRIALS = 3, 4
SWEEP = ["model=mlp", "tune.num_cpus=2", "tune.max_concurrent_trials=2", "tune.search_alg=random", "tune.metric=val/acc", "tune.mode=max",
         f"tune.num_samples={TRIALS}", "tune.scheduler=fifo", f"tune.max_epochs={EPOCHS}",
         *sweeps.space(**{"optimizer.lr": "loguniform(1e-3, 1e-1)"})]
STAGE = [sys.executable, "-m", "pipeline.cli.stages", "tune"]


@dataclass
class Sweep:
    """What a finished sweep chose and measured, by trial config (trial ids differ per sweep)."""

    best: dict                                  # best.yaml
    curves: dict[float, list[float]]            # optimizer.lr -> val/acc of each epoch
    values: dict[float, float]                  # optimizer.lr -> the trial's best val/acc

    @classmethod
    def read(cls, root: Path) -> Sweep:
        trials = sweeps.trials(root)
        lr = {t["trial_id"]: float(t["optimizer.lr"]) for t in trials}
        curves: dict[float, list[float]] = {lr[t]: [] for t in lr}
        for row in json.loads((root / "out/results/tune/curves.json").read_text()):
            curves[lr[row["trial_id"]]].append(row["val_acc"])
        return cls(sweeps.best(root), curves, {lr[t["trial_id"]]: float(t["best_val_acc"]) for t in trials})

    def choice(self) -> tuple[dict, float]:
        return self.best["overrides"], self.best["value"]


def differing(a: Sweep, b: Sweep) -> tuple[int, int]:
    """(trials of `a` with no trial of the same config in `b`, epoch values that differ)."""
    missing = len(set(a.curves) - set(b.curves))
    values = sum(x != y for lr in set(a.curves) & set(b.curves) for x, y in zip(a.curves[lr], b.curves[lr]))
    return missing, values


@pytest.fixture(scope="module")
def reference(local_ray, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """The sweep run once without a fault, in this process."""
    root = tmp_path_factory.mktemp("reference")
    cfg = make_cfg(root, SWEEP)
    ensure_data(cfg)
    tune(cfg)
    return Sweep.read(root)


# ---------------------------------------------------------------------------- 3. driver killed

def _ray_processes(driver: int) -> tuple[list[psutil.Process], str]:
    """The processes the driver's private Ray runs (raylet, GCS, agents, trial workers) and
    its session folder, named after the driver's pid."""
    procs = psutil.Process(driver).children(recursive=True)
    raylet = next(p for p in procs if _name(p) == "raylet")
    session = next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--session_dir="))
    assert session.endswith(f"_{driver}"), session
    return procs, session


def _name(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return p.name()
    return ""  # it has exited since it was listed


def _still_running(procs: list[psutil.Process], session: str) -> list[psutil.Process]:
    """Those of `procs`, and any other process naming `session`, not yet exited (a zombie has)."""
    def alive(p: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error):
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        return False

    named = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if any(session in arg for arg in p.cmdline()):
                named.append(p)
    return [p for p in {*procs, *named} if alive(p)]


def _child_statuses(db: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
        return [s for (s,) in con.execute("SELECT r.status FROM runs r JOIN tags t ON r.run_uuid = t.run_uuid "
                                          "WHERE t.key = 'mlflow.parentRunId'")]


def _checkpointed_to_the_end(experiment: Path, trial_id: str) -> bool:
    """The trial's folder holds a checkpoint of its last epoch."""
    [folder] = [p for p in experiment.iterdir() if p.is_dir() and f"_{trial_id}_" in p.name]
    metas = [json.loads(m.read_text()) for m in folder.glob("checkpoint_*/trial_meta.json")]
    return any(m["epoch"] == EPOCHS - 1 for m in metas)


@pytest.mark.fault("3. Sweep: driver killed", fault="SIGKILL to the sweep driver (own Ray) while trials train; "
                   "then the same command with tune.resume=true",
                   expected="exit 137; the dead driver's Ray processes exit; the resumed sweep: one MLflow child "
                            "per trial, none RUNNING, parent FINISHED, best.yaml as an uninterrupted sweep")
def test_sweep_driver_killed_then_resumed(cfg_factory, tmp_path: Path, observe, request):
    cfg = cfg_factory(SWEEP)
    ensure_data(cfg)
    params, resumed = tmp_path / "sweep.yaml", tmp_path / "resume.yaml"
    OmegaConf.save(cfg, params)
    OmegaConf.save(cfg_factory([*SWEEP, "tune.resume=true"]), resumed)
    db, log = tmp_path / "mlflow.db", tmp_path / "killed.log"

    with log.open("w") as out:
        driver = subprocess.Popen([*STAGE, str(params)], cwd=tmp_path, env=project_env(), stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_an_epoch(db, driver, log)
            ray_procs, session = _ray_processes(driver.pid)
            trial_workers = [p for p in ray_procs if "ImplicitFunc" in _name(p)]
            driver.send_signal(signal.SIGKILL)
            status = driver.wait(timeout=60)
            killed_at = time.monotonic()
        finally:
            if driver.poll() is None:  # the test failed before the kill: stop the group it started
                os.killpg(driver.pid, signal.SIGKILL)  # (trial workers leave it, but exit with their raylet)
    assert status == -signal.SIGKILL
    assert trial_workers, [_name(p) for p in ray_procs]  # trials were training when it died
    left = _child_statuses(db)
    assert left.count("RUNNING") >= 1, left
    assert "RUNNING" in _run_statuses(db) and not (tmp_path / "out/results/tune/best.yaml").exists()
    observe.saw(f"exit {128 - status} with {left.count('RUNNING')} of {len(left)} trial runs RUNNING")

    done = subprocess.run([*STAGE, str(resumed)], cwd=tmp_path, env=project_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Resuming the sweep in" in done.stdout

    client, parent, children = sweeps.tree(tmp_path)
    trials = sweeps.trials(tmp_path)
    trial_ids = [c.data.tags["trial_id"] for c in children]
    assert parent.info.status == "FINISHED", parent.info.status
    assert {t["status"] for t in trials} == {"TERMINATED"} and len(trials) == TRIALS
    assert sorted(trial_ids) == sorted(t["trial_id"] for t in trials)  # one run per trial, none twice
    assert all(c.info.status == "FINISHED" for c in children), [c.info.status for c in children]
    missing = retrained = 0
    for child in children:
        for key in EPOCH_METRICS:
            missing += len(set(range(EPOCHS)) - set(sweeps.steps(client, child.info.run_id, key)))
        steps = sweeps.steps(client, child.info.run_id)
        retrained += len(steps) - len(set(steps))  # epochs after the last state Tune had saved
    experiment = Path(parent.data.tags["ray_experiment"])
    unsaved = sum(not _checkpointed_to_the_end(experiment, t["trial_id"]) for t in trials)

    # Run now (once for the module), while the dead driver's last processes wind down.
    reference: Sweep = request.getfixturevalue("reference")
    again = Sweep.read(tmp_path)
    lost_trials, changed = differing(reference, again)
    observe.saw(f"resumed: exit 0, {len(children)} runs for {len(trials)} trials, all FINISHED, parent FINISHED; "
                f"{retrained} epochs trained and logged again (after the last state Tune had saved); best "
                f"{'as' if again.choice() == reference.choice() else 'NOT as'} uninterrupted: "
                f"lr={again.best['overrides']['optimizer.lr']:.4g}, val/acc={again.best['value']:.4f}")

    # The dead driver's Ray: raylet, GCS and workers go with it; its two agents exit once
    # they have failed to tell the dead GCS about it (Ray gives that 60 s).
    deadline = killed_at + 180
    while (leftover := _still_running(ray_procs, session)) and time.monotonic() < deadline:
        time.sleep(1)
    observe.saw(f"{len(leftover)} of the {len(ray_procs)} Ray processes of the dead driver left "
                f"{time.monotonic() - killed_at:.0f} s after the kill (they exit by themselves)")
    finished = {c.data.tags["trial_id"] for c in children if c.info.status == "FINISHED"}
    lost = observe.lost(runs=TRIALS - len(finished) + len(trial_ids) - len(set(trial_ids)),
                        metrics=missing + changed, checkpoints=unsaved,
                        outputs=int(again.choice() != reference.choice()) + lost_trials)
    assert lost == {"runs": 0, "metrics": 0, "checkpoints": 0, "outputs": 0}
    assert again.choice() == reference.choice() and again.values == reference.values
    assert not leftover, [(p.pid, _name(p)) for p in leftover]


# ---------------------------------------------------------------------------- 8. determinism

@pytest.mark.fault("8. Determinism: sweep", fault="the same seeded random-search sweep run twice",
                   expected="the same trial configs, the same metrics every epoch, the same best trial")
def test_seeded_sweep_picks_the_same_best_twice(reference: Sweep, cfg_factory, tmp_path: Path, observe):
    cfg = cfg_factory(SWEEP)
    ensure_data(cfg)
    tune(cfg)
    again = Sweep.read(tmp_path)

    lost_trials, changed = differing(reference, again)
    same = again.choice() == reference.choice()
    observe.saw(f"{len(again.curves)} trials, {sum(map(len, again.curves.values()))} epoch values; "
                f"{changed} differ; best {'the same' if same else 'DIFFERENT'}: "
                f"lr={again.best['overrides']['optimizer.lr']:.4g}, val/acc={again.best['value']:.4f}")
    lost = observe.lost(runs=lost_trials, metrics=changed, outputs=int(not same))
    assert lost == {"runs": 0, "metrics": 0, "checkpoints": 0, "outputs": 0}
    assert again.curves == reference.curves and again.best["overrides"] == reference.best["overrides"]
    assert again.best["value"] == reference.best["value"]
