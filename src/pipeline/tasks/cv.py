"""The cross-validation task: one model per stratified fold, aggregated with confidence
intervals, tracked as an MLflow parent run with one child run per fold.

Fold i trains on the other k-1 folds and validates on fold i (`data.fold`); the test split
is never seen during training. Folds run one after another, or in parallel as Ray tasks
(`cv.parallel`), with identical results for the same seed: each fold is seeded and
deterministic on its own.
"""

from __future__ import annotations

import contextlib
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.analysis.stats import summarize
from pipeline.config import flatten, fold_config, to_container
from pipeline.layout import Layout
from pipeline.tasks.common import write_json
from pipeline.tracking.mlflow_run import TrackedRun, tracking_target
from pipeline.validation import prepare

# Metrics aggregated over folds (what each fold's train + evaluate return).
CV_METRICS = ("val/acc", "val/loss", "test/acc", "test/loss", "test/f1_macro")
CANCEL_TIMEOUT_S = 30  # for cancelled folds to end their MLflow runs


def run_fold(cfg: dict[str, Any], fold: int, parent_run_id: str | None) -> dict[str, float]:
    """Train and evaluate one fold (a plain dict config, so a Ray task can take it)."""
    from pipeline.tasks.evaluate import evaluate
    from pipeline.tasks.train import train

    fold_cfg = fold_config(OmegaConf.create(cfg), fold)
    metrics = train(fold_cfg, parent_run_id=parent_run_id, run_tags={"fold": str(fold)})
    metrics.update(evaluate(fold_cfg))
    return {"fold": fold, **metrics}


def _run_parallel(cfg: dict[str, Any], folds: list[int], parent_run_id: str | None,
                  cpus_per_fold: int) -> list[dict]:
    import ray

    from pipeline.tuning.stopping import keeps_sigterm_handler, sigterm_interrupts_ray

    started = not ray.is_initialized()
    if started:
        with keeps_sigterm_handler():
            ray.init(num_cpus=max(cpus_per_fold, 1) * min(len(folds), 2), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(num_cpus=cpus_per_fold)(run_fold)
        refs = [task.remote(cfg, fold, parent_run_id) for fold in folds]
        try:
            with sigterm_interrupts_ray():
                return ray.get(refs)
        except BaseException:
            # A stop signal, or one fold failed: ray.shutdown would kill the other folds' workers
            # and leave their MLflow runs RUNNING. Cancelling raises KeyboardInterrupt in each
            # running fold instead, so its run ends KILLED.
            for ref in refs:
                ray.cancel(ref)
            ray.wait(refs, num_returns=len(refs), timeout=CANCEL_TIMEOUT_S)
            raise
    finally:
        if started:
            ray.shutdown()


def cross_validate(cfg: DictConfig, *, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train one model per fold; writes `metrics/cv.json` (mean, std, 95% CI, per-fold values).

    The CV run is an MLflow parent of the fold runs (and itself a child of `parent_run_id`,
    e.g. a comparison's run, when given).
    """
    cfg = prepare(cfg)
    layout = Layout.from_cfg(cfg)
    folds = list(range(cfg.data.split.folds))
    plain = to_container(cfg)
    parent = None
    if cfg.tracking.enabled:
        run_name = cfg.tracking.run_name or f"cv-{cfg.name}-{cfg.model.name}-{cfg.data.name}"
        parent = TrackedRun.start(**tracking_target(cfg.tracking, cfg.paths.root), run_name=run_name, parent_run_id=parent_run_id,
                                  tags={"dataset": cfg.data.name, "model": cfg.model.name, "cv_folds": str(len(folds))})
    with parent if parent is not None else contextlib.nullcontext():
        if parent is not None:
            parent.log_params(flatten(plain))
        parent_id = parent.run_id if parent is not None else None
        if cfg.cv.parallel:
            results = _run_parallel(plain, folds, parent_id, cfg.cv.cpus_per_fold)
        else:
            results = [run_fold(plain, fold, parent_id) for fold in folds]
        results.sort(key=lambda r: r["fold"])
        summary = {key: summarize([r[key] for r in results], confidence=cfg.cv.confidence)
                   for key in CV_METRICS if all(key in r for r in results)}
        out = {"folds": len(folds), "confidence": cfg.cv.confidence,
               "model_params": results[0]["model/params"], "model_macs": results[0]["model/macs"],
               **{key.replace("/", "_"): stats for key, stats in summary.items()}}
        write_json(layout.metrics / "cv.json", out)
        if parent is not None:
            parent.log_metrics({f"cv/{key}/{stat}": value for key, stats in summary.items()
                                for stat, value in stats.items() if stat in ("mean", "std", "ci_low", "ci_high")})
            parent.log_artifact(layout.metrics / "cv.json")
    return out
