"""What a task's command prints when it ends: its results, where its outputs went, and its
MLflow run. One function per task, called by both ways in (the Hydra app, `pipeline.cli.apps`,
and the DVC stage, `pipeline.cli.stages`), so `pipeline cv` and `dvc repro cv` say the same.

Each takes the config the command ran with and what its task returned, and returns the lines;
`hint=False` leaves out how to open a local store's UI (a sweep's jobs: the sweep's table
says it once).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.config import resolve_paths
from pipeline.tracking.links import run_lines
from pipeline.tracking.mlflow_run import tracking_target


def run_of_outputs(cfg: DictConfig) -> tuple[str, str] | None:
    """(tracking URI, run id) of the run whose checkpoints `cfg`'s outputs hold (`models/run.json`)."""
    path = Path(resolve_paths(cfg).paths.out_dir) / "models" / "run.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    return info["tracking_uri"], info["run_id"]


def tracking_uri(cfg: DictConfig) -> str:
    """The store `cfg`'s runs go to (relative paths from the project root)."""
    return tracking_target(cfg.tracking, resolve_paths(cfg).paths.root)["tracking_uri"]


def _run(cfg: DictConfig, run_id: str | None, *, hint: bool, label: str = "run") -> list[str]:
    if not run_id:
        return [] if cfg.tracking.enabled else [f"{label}: not tracked (tracking.enabled=false)"]
    return run_lines(tracking_uri(cfg), run_id, label=label, hint=hint)


def train(cfg: DictConfig, metrics: dict[str, Any], *, hint: bool = True) -> list[str]:
    """The train task's (and evaluate's: the test metrics join the same run) summary."""
    shown = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/")) and not k.endswith("/n")}
    line = "  ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items()))
    if "best_epoch" in metrics and metrics["best_epoch"] >= 0:  # stored 0-based, as Lightning counts
        line += f"  (best epoch {int(metrics['best_epoch']) + 1} of {int(metrics['epochs'])})"
    lines = [line, f"outputs: {resolve_paths(cfg).paths.out_dir}"]
    run = run_of_outputs(cfg)
    if run is not None:
        return [*lines, *run_lines(*run, hint=hint)]
    return [*lines, *_run(cfg, None, hint=hint)]


def tune(cfg: DictConfig, best: dict[str, Any], *, hint: bool = True) -> list[str]:
    where = f"mean of {best['folds']} folds" if "folds" in best else f"epoch {int(best['epoch']) + 1}"
    return ["best: " + "  ".join(f"{k}={v}" for k, v in best["overrides"].items()),
            f"{best['metric']}={best['value']:.4f} (trial {best['trial_id']}, {where})",
            f"outputs: {resolve_paths(cfg).paths.out_dir}/results/tune",
            *_run(cfg, best.get("mlflow_parent_run_id"), hint=hint, label="sweep run")]


def cv(cfg: DictConfig, result: dict[str, Any], *, hint: bool = True) -> list[str]:
    lines = []
    nested = result.get("nested", False)  # then scored on the held-out outer folds
    inner = f"inner/{cfg.tune.metric}"  # each sweep's own score of its pick
    for key in (inner, "outer/acc", "test/acc") if nested else ("val/acc", "test/acc"):
        if key not in result:
            continue
        s = result[key]
        lines.append(f"{key}: {s['mean']:.4f} ± {s['std']:.4f}  ({result['confidence']:.0%} CI {s['ci_low']:.4f}–"
                     f"{s['ci_high']:.4f})  folds: {', '.join(f'{v:.4f}' for v in s['values'])}")
    if "ensemble/test/acc" in result:
        lines.append(f"ensemble of the {result['ensemble/models']} fold models (mean of softmax): test/acc="
                     f"{result['ensemble/test/acc']:.4f}  (mean single fold {result['test/acc']['mean']:.4f})")
    for choice in result.get("choices", []):
        lines.append(f"outer fold {choice['fold']} chose " + ", ".join(f"{k}={v}" for k, v in choice["overrides"].items()))
    lines.append(f"outputs: {resolve_paths(cfg).paths.out_dir}")
    return [*lines, *_run(cfg, result.get("mlflow_run_id"), hint=hint)]


def compare(cfg: DictConfig, stats: dict[str, Any], *, hint: bool = True) -> list[str]:
    return [*stats["statements"], f"report: {resolve_paths(cfg).paths.out_dir}/reports/compare.md",
            *_run(cfg, stats.get("mlflow_run_id"), hint=hint)]


def report(cfg: DictConfig, path: Path, run_id: str | None = None, *, hint: bool = True) -> list[str]:
    """`run_id`: the run reported on (`pipeline report run_id=...`); else the outputs' run."""
    lines = [f"report: {path}"]
    if run_id:
        return [*lines, *_run(cfg, run_id, hint=hint)]
    run = run_of_outputs(cfg)
    return [*lines, *(run_lines(*run, hint=hint) if run else [])]

