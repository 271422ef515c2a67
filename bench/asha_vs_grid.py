"""ASHA against an exhaustive grid: same 16 configurations, same epoch budget.

Runs the same grid twice with ``pipeline.tasks.tune.tune`` on digits, on one local
Ray of 2 CPUs (2 concurrent trials of 1 CPU), the composed config with every path, the Ray
storage and a SQLite MLflow store in a temporary folder:

- ASHA: ``tune.search_alg=grid``, ``tune.scheduler=asha`` (``--grace-period``,
  ``--reduction-factor``, one bracket, ``max_t = --epochs``): every configuration starts,
  the worse ones stop at the rungs.
- grid: ``tune.search_alg=grid``, ``tune.scheduler=fifo``: every configuration trains all
  ``--epochs`` epochs.

The space is ``optimizer.lr`` grid[3e-4, 1e-3, 3e-3, 1e-2] x ``regularizer.dropout``
grid[0.0, 0.2, 0.4, 0.6] (16 configurations; the rest as ``tune=lr_decay_dropout`` fixes
it: Adam, exponential decay). Each sweep's wall time is the driver's clock around
``Tuner.fit()`` (the MLflow parent run's ``time/sweep_s``); Ray starts once, before both.
Its best validation accuracy is the best epoch's ``val/acc`` of its best trial (what
``results/tune/best.yaml`` records). The gap is ASHA's minus the grid's, so negative
means ASHA found a worse configuration. Half of digits is the validation split
(``--val-fraction 0.5``: 899 images, 35% left to train on), so that the validation score
separates the configurations; with the usual 15% (270 images) several reach 100% and a gap
of 0 says little.

    .venv/bin/python bench/asha_vs_grid.py [--model minivgg] [--epochs 32] [--val-fraction 0.5]
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

from omegaconf import DictConfig, open_dict

from pipeline.config import compose

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CPUS = 2
LRS = "3e-4, 1e-3, 3e-3, 1e-2"
DROPOUTS = "0.0, 0.2, 0.4, 0.6"

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


def sweep(tmp: Path, args: argparse.Namespace, scheduler: str) -> dict:
    """One sweep of the grid; its wall time, best val/acc and epochs trained in all."""
    from mlflow import MlflowClient

    from pipeline.tasks.data import ensure_data
    from pipeline.tasks.tune import tune

    cfg = sweep_cfg(tmp, [
        f"model={args.model}", "tune=lr_decay_dropout", "~tune.space",
        f'+tune.space={{optimizer.lr: "grid[{LRS}]", regularizer.dropout: "grid[{DROPOUTS}]"}}',
        "tune.search_alg=grid", "tune.metric=val/acc", "tune.mode=max", f"tune.scheduler={scheduler}", f"tune.max_epochs={args.epochs}",
        f"tune.asha.grace_period={args.grace_period}", f"tune.asha.reduction_factor={args.reduction_factor}",
        "tune.asha.brackets=1", f"tune.num_cpus={CPUS}", "tune.max_concurrent_trials=2",
        "tune.resources.cpu=1", "tune.resources.gpu=0", f"data.split.val_fraction={args.val_fraction}"])
    ensure_data(cfg)
    best = tune(cfg)
    wall = MlflowClient(cfg.tracking.tracking_uri).get_run(best["mlflow_parent_run_id"]).data.metrics["time/sweep_s"]
    with (tmp / "out" / "results" / "tune" / "trials.csv").open() as f:
        trials = list(csv.DictReader(f))
    return {"wall": float(wall), "best": float(best["value"]), "trials": len(trials),
            "epochs": sum(int(t["epochs"]) for t in trials),
            "config": f"lr={best['overrides']['optimizer.lr']:g} dropout={best['overrides']['regularizer.dropout']:g}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minivgg", help="a conf/model/ name (default minivgg)")
    parser.add_argument("--epochs", type=int, default=32, help="epoch budget per trial (tune.max_epochs, ASHA max_t)")
    parser.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before the first rung")
    parser.add_argument("--reduction-factor", type=int, default=4, help="ASHA: 1/this of the trials go on per rung")
    parser.add_argument("--val-fraction", type=float, default=0.5,
                        help="share of digits in the validation split (data.split.val_fraction)")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import ray

    from pipeline.tuning.ray_init import init_ray

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-asha-") as tmp:
        init_ray({"num_cpus": CPUS})  # once for both, so Ray's start-up is outside either clock
        try:
            runs = {name: sweep(Path(tmp).resolve() / name, args, scheduler)
                    for name, scheduler in (("asha", "asha"), ("grid", "fifo"))}
        finally:
            ray.shutdown()
    asha, grid = runs["asha"], runs["grid"]

    print(f"\ndigits / {args.model}, {asha['trials']} configurations (lr {LRS} x dropout {DROPOUTS}), "
          f"{args.epochs} epochs each at most, ASHA grace {args.grace_period} reduction {args.reduction_factor}, "
          f"val fraction {args.val_fraction:g}, 2 concurrent trials of 1 CPU, load avg {os.getloadavg()[0]:.1f}, {time.perf_counter() - began:.0f} s in all")
    print(f"{'':6} {'trials':>6} {'epochs':>7} {'wall s':>8} {'best val/acc':>13}  best configuration")
    for name, r in runs.items():
        print(f"{name:6} {r['trials']:6d} {r['epochs']:7d} {r['wall']:8.1f} {r['best']:13.4f}  {r['config']}")
    print(f"asha/grid time ratio: {asha['wall'] / grid['wall']:.2f}, best val/acc gap: {asha['best'] - grid['best']:+.3f}")


if __name__ == "__main__":
    main()
