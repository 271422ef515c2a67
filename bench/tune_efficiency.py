"""Ray Tune efficiency: how much of a sweep's wall time the trials spend training.

Runs one real sweep (``pipeline.tasks.tune.tune``) of ``--trials`` short trials on
digits, FIFO scheduler (no early stopping), 2 concurrent trials of 1 CPU each on a local
Ray of 2 CPUs, with the composed config (``tune=lr_decay_dropout``: random lr, decay and
dropout) and every path, the Ray storage and the MLflow store (SQLite) inside a temporary
folder. Then

    efficiency = sum of the trials' training times / (sweep wall time x concurrency)

- a trial's training time is the train task's own ``time/train_s`` (the trial folder's
  ``metrics/train.json``): the wall time of ``Trainer.fit``, i.e. every epoch's training,
  validation, Lightning checkpoints and the per-epoch report to Tune. It leaves out the
  trial's set-up (config, loading the prepared split, building model and Trainer) and its
  outputs after fit (curves, plot), and everything of Ray's (actor start, scheduling).
  For comparison the table also sums Tune's ``time_total_s`` (the trainable's wall time
  from its start to its last report, about ``time/train_s`` plus the set-up) and prints the
  efficiency by that measure too, before the main line.
- the sweep wall time is the driver's own clock around ``Tuner.fit()`` (the MLflow parent
  run's ``time/sweep_s``); Ray is started, and the SQLite MLflow store created, before it.
- concurrency is 2: ``tune.max_concurrent_trials=2``, 1 CPU per trial, 2 CPUs.

It also splits the sweep in two, from each trial's ``Trainer.fit`` start and end times
(recorded by a callback in the trials): the cold start, from the sweep's start to the
first trial's first training step (starting the first Ray actors, importing torch and
Lightning in them), and the steady state after it, whose efficiency is the sum of the
training times / (concurrency x (last fit end - first fit start)).

1.00 would mean both CPUs trained a trial every second of the sweep.

    .venv/bin/python bench/tune_efficiency.py [--trials 16] [--epochs 8] [--model lenet5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, open_dict

from pipeline.config import compose

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CPUS = 2

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def sweep_cfg(tmp: Path, overrides: list[str]) -> DictConfig:
    """The composed config with every path, the Ray storage and a SQLite MLflow store in `tmp`."""
    cfg = compose(["trainer.enable_progress_bar=false", "tracking.enabled=true", *overrides], conf=CONF_DIR)
    with open_dict(cfg):
        cfg.paths.root = str(tmp)
        cfg.paths.data_dir = str(tmp / "data")
        cfg.paths.download_dir = str(tmp / "downloads")
        cfg.paths.out_dir = str(tmp / "out")
        cfg.tune.storage_path = str(tmp / "ray")
        cfg.tracking.tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
        cfg.tracking.artifact_location = str(tmp / "mlartifacts")
    return cfg


class FitClock(Callback):
    """In every trial: appends the wall-clock start and end of ``Trainer.fit`` to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, event: str) -> None:
        with open(self.path, "a") as f:  # one short line per write: O_APPEND keeps lines whole
            f.write(json.dumps({"event": event, "t": time.time(), "pid": os.getpid()}) + "\n")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._write("start")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write("end")


def trial_times(experiment: str) -> dict[str, tuple[float, float]]:
    """Per trial: (``time_train_s`` of its ``metrics/train.json``, last ``time_total_s`` of its ``result.json``)."""
    times = {}
    for result in sorted(Path(experiment.removeprefix("file://")).glob("*/result.json")):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        train = json.loads((result.parent / "metrics" / "train.json").read_text())
        if lines:
            times[lines[-1]["trial_id"]] = (float(train["time_train_s"]), float(lines[-1]["time_total_s"]))
    return times


def sweep_seconds(cfg: DictConfig, parent_run_id: str) -> float:
    from mlflow import MlflowClient

    return float(MlflowClient(cfg.tracking.tracking_uri).get_run(parent_run_id).data.metrics["time/sweep_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16, help="trials of the sweep (tune.num_samples)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per trial (tune.max_epochs)")
    parser.add_argument("--model", default="lenet5", help="a conf/model/ name (default lenet5)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="run in this folder and keep it (default: a temporary folder, removed after)")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import ray

    from pipeline.tasks.data import ensure_data
    from pipeline.tasks.tune import tune
    from pipeline.tuning.ray_init import init_ray

    concurrency = 2
    began = time.perf_counter()
    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        cfg = sweep_cfg(Path(tmp).resolve(), [
            f"model={args.model}", "tune=lr_decay_dropout", "tune.metric=val/acc", "tune.mode=max", "tune.scheduler=fifo",
            "tune.search_alg=random",
            f"tune.num_samples={args.trials}", f"tune.max_epochs={args.epochs}", f"tune.num_cpus={CPUS}",
            f"tune.max_concurrent_trials={concurrency}", "tune.resources.cpu=1", "tune.resources.gpu=0"])
        ensure_data(cfg)
        # A project's MLflow store exists after its first run; creating a fresh SQLite store
        # (about 2 s of schema migrations) is a one-off, like Ray's start-up: both happen here,
        # outside the sweep's clock.
        from mlflow import MlflowClient

        MlflowClient(cfg.tracking.tracking_uri).search_experiments()
        init_ray({"num_cpus": CPUS})
        clock = Path(tmp) / "fit_clock.jsonl"
        try:
            sweep_start = time.time()
            best = tune(cfg, trial_callbacks=[FitClock(str(clock))])
        finally:
            ray.shutdown()
        times = trial_times(best["experiment"])
        wall = sweep_seconds(cfg, best["mlflow_parent_run_id"])
        events = [json.loads(line) for line in clock.read_text().splitlines()]
    total = sum(t[0] for t in times.values())
    trainable = sum(t[1] for t in times.values())
    efficiency = total / (wall * concurrency)

    print(f"\ndigits / {args.model}, {args.trials} trials x {args.epochs} epochs, FIFO, {concurrency} concurrent "
          f"trials of 1 CPU on {CPUS} CPUs, load avg {os.getloadavg()[0]:.1f}, "
          f"{time.perf_counter() - began:.0f} s in all")
    print(f"{'trials':>7} {'wall s':>8} {'concurrency':>12} {'sum train s':>12} {'mean train s':>13} "
          f"{'sum trainable s':>16} {'best val/acc':>13}")
    print(f"{len(times):7d} {wall:8.1f} {concurrency:12d} {total:12.1f} {total / max(1, len(times)):13.2f} "
          f"{trainable:16.1f} {best['value']:13.4f}")
    starts = [e["t"] for e in events if e["event"] == "start"]
    ends = [e["t"] for e in events if e["event"] == "end"]
    cold, steady = min(starts) - sweep_start, max(ends) - min(starts)
    print(f"cold start (sweep start -> first trial training): {cold:.1f} s; then {steady:.1f} s until the last "
          f"trial ended, steady-state efficiency {total / (steady * concurrency):.2f}")
    print(f"efficiency counting the whole trainable (time_total_s): {trainable / (wall * concurrency):.2f}")
    print(f"efficiency: {efficiency:.2f}")


if __name__ == "__main__":
    main()
