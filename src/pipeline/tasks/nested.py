"""Nested cross-validation (`pipeline cv cv.nested=true`): the unbiased estimate of "tune,
then train".

Plain cross-validation scores one fixed configuration. A configuration chosen by a sweep
that saw the same data scores too well there: the choice itself was fitted to that data.
Here each outer fold i (the split's fold i, as plain CV validates on) runs the whole sweep
(`tune.*`, picking by the mean over `cv.inner_folds` inner folds, `tune.cv=true`) on the
other outer folds only, refits the configuration it chose on that same training part, as the
train stage would (early stopping on a `data.split.val_fraction` validation part), and
scores the refitted model once on the held-out fold i. The mean over outer folds, with its
interval, estimates what the whole procedure delivers on unseen data
(`pipeline.data.nested` makes the index sets).

Outputs: `metrics/cv.json` (the summary: `outer/*` on the held-out folds, `test/*` of the
same models on the test split, `inner/<tune.metric>` the sweeps' own scores, and each outer fold's
choice), and per outer fold `cv/nested/outer_<i>/`: the sweep's `results/tune/`, the refitted
model and `metrics/outer.json`. MLflow: a nested-CV run > one run per outer fold > its
sweep's run > trial runs > inner-fold runs, beside the outer fold's refit run.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pipeline.analysis.stats import summarize
from pipeline.config import flatten, open_dict, to_container
from pipeline.data.nested import OuterFold, outer_fold
from pipeline.errors import ConfigError, Terminated
from pipeline.files import write_text
from pipeline.layout import Layout
from pipeline.tasks.common import TrainingData, load_data, sweep_inputs, write_json
from pipeline.tasks.evaluate import predict, scores
from pipeline.tasks.train import train
from pipeline.tracking.mlflow_run import TrackedRun, tracking_target
from pipeline.tracking.server import check_tracking
from pipeline.training.metrics import file_row
from pipeline.training.network import load_network
from pipeline.tuning.driver import SweepInterrupted, run_sweep
from pipeline.tuning.plan import plan_sweep
from pipeline.tuning.ray_init import init_ray
from pipeline.validation import prepare, refuse_resume

log = logging.getLogger(__name__)

SCORES = ("acc", "loss", "f1_macro")  # of the refitted model, on the held-out fold and the test split


def check_nested(cfg: DictConfig) -> None:
    """ConfigError for what nested cross-validation cannot do (`cfg` prepared)."""
    if cfg.cv.parallel is True:  # auto: sequential
        raise ConfigError("cv.nested=true with cv.parallel=true: nested CV runs its outer folds one after another, "
                          "each fold's sweep already in parallel on Ray (tune.max_concurrent_trials); "
                          "set cv.parallel=auto or false.")
    if cfg.cv.get("repeats", 1) > 1:
        raise ConfigError(f"cv.nested=true with cv.repeats={cfg.cv.repeats}: the outer folds are one k-fold "
                          "partition (data.split.folds); set cv.repeats=1.")
    if cfg.tune.get("objectives"):
        raise ConfigError("cv.nested=true with tune.objectives: each outer fold's sweep must choose one "
                          "configuration by one score (its inner k-fold mean); drop tune.objectives.")
    if cfg.data.fold is not None:
        raise ConfigError(f"cv.nested=true runs every outer fold itself, but data.fold={cfg.data.fold} is set: "
                          "drop the data.fold override (data.fold=null).")
    if cfg.tune.resume:
        raise ConfigError("cv.nested=true starts a new sweep per outer fold; it cannot resume one: "
                          "set tune.resume=false.")
    if cfg.tune.scheduler == "pbt":
        raise ConfigError("cv.nested=true with tune.scheduler=pbt: the inner sweeps pick by the mean over inner "
                          "folds (tune.cv=true), which PBT's mid-training swaps cannot do; use tune.scheduler=asha, "
                          "hyperband or fifo.")
    if cfg.tune.workers > 1:
        raise ConfigError("cv.nested=true trains each trial's inner folds in one process; it does not combine "
                          "with tune.workers > 1 (DDP): set tune.workers=1.")


def check_nested_cv(cfg: DictConfig) -> DictConfig:
    """Validate a nested cross-validation as far as the config goes (the inner folds' class
    counts need the data): the prepared config. Before Ray, MLflow or the data are touched."""
    cfg = prepare(cfg)
    refuse_resume(cfg, "nested cross-validation")
    check_nested(cfg)
    try:
        plan_sweep(sweep_config(cfg, 0, outer_dir(Layout.from_cfg(cfg), 0)))  # every outer fold's sweep alike
    except ConfigError as err:
        raise ConfigError(f"cv.nested=true: each outer fold's sweep would fail: {err}") from err
    return cfg


def outer_dir(layout: Layout, fold: int) -> Path:
    return layout.root_out / "cv" / "nested" / f"outer_{fold}"


def sweep_config(cfg: DictConfig, fold: int, out: Path) -> DictConfig:
    """Outer fold `fold`'s sweep: k-fold trials over `cv.inner_folds` inner folds, its outputs
    (`results/tune/`) in `out`, its own Ray experiment name."""
    sweep = cfg.copy()
    with open_dict(sweep):
        sweep.data.split.folds = cfg.cv.inner_folds
        sweep.tune.cv = True
        sweep.tune.use_best = False
        sweep.tune.name = f"{cfg.tune.name}-nested-outer{fold}"
        # On a private local Ray, the Ray experiments stay where the cv run's sweep would keep
        # its own, not inside the outer fold's folder (under cv/, a DVC output). On a cluster
        # (tune.address) an unset storage_path stays unset: the driver refuses a local folder
        # on several nodes and asks for a shared one.
        if not cfg.tune.get("storage_path") and not cfg.tune.get("address"):
            sweep.tune.storage_path = str(Path(cfg.paths.out_dir) / "results" / "ray")
        sweep.paths.out_dir = str(out)
    return sweep


def refit_config(cfg: DictConfig, fold: int, out: Path) -> DictConfig:
    """The refit of outer fold `fold`: the user's config with the fold's sweep's choice applied
    by the train task itself (`tune.use_best` reads `out/results/tune/best.yaml`), as the
    train stage applies the tune stage's."""
    refit = cfg.copy()
    with open_dict(refit):
        refit.tune.use_best = True
        refit.tracking.log_model = False  # evidence, not a deliverable
        refit.paths.out_dir = str(out)
        if cfg.tracking.run_name:
            refit.tracking.run_name = f"{cfg.tracking.run_name}-outer{fold}-refit"
    return refit


def _score(data: TrainingData, idx: np.ndarray, cfg: DictConfig) -> dict[str, float]:
    """The refitted model (`cfg`'s best checkpoint) on the samples `idx`, as evaluate scores."""
    module = load_network(Layout.from_cfg(cfg).best_ckpt)
    probs = predict(module.net, data.raw.images, indices=idx, batch_size=cfg.data.eval_batch_size,
                    regularizer=cfg.regularizer)
    overall, _, _ = scores(probs, data.raw.labels[idx], data.raw.classes)
    return {k: overall[k] for k in SCORES}


def run_outer(cfg: DictConfig, outer: OuterFold, data: TrainingData, layout: Layout,
              parent_id: str | None) -> dict[str, Any]:
    """Sweep, refit and score one outer fold, under its own MLflow run (if tracking)."""
    out = outer_dir(layout, outer.fold)
    run = None
    if cfg.tracking.enabled:
        prefix = cfg.tracking.run_name or f"nested-cv-{cfg.name}-{cfg.model.name}-{cfg.data.name}"
        run = TrackedRun.start(**tracking_target(cfg.tracking, cfg.paths.root), run_name=f"{prefix}-outer{outer.fold}",
                               parent_run_id=parent_id, tags={"outer_fold": str(outer.fold), "nested_cv": "outer_fold"})
    with run if run is not None else contextlib.nullcontext():
        run_id = run.run_id if run is not None else None
        inner_data = TrainingData(data.raw, outer.inner, data.tags)
        try:
            best = run_sweep(sweep_config(cfg, outer.fold, out), train=train, parent_run_id=run_id,
                             load=lambda c: load_data(c, Layout.from_cfg(c), inner_data), inputs=sweep_inputs)
        except (SweepInterrupted, Terminated) as err:
            # A stop signal: every run above the sweep ends KILLED, not FAILED, and the sweep's
            # own "resume it" does not apply: nested CV starts its sweeps anew.
            log.warning("Outer fold %d's sweep stopped; nested cross-validation cannot resume a sweep (any hint "
                        "to resume it does not apply): run it again.", outer.fold)
            raise (Terminated("terminated") if isinstance(err, Terminated) else KeyboardInterrupt()) from err
        refit_cfg = prepare(refit_config(cfg, outer.fold, out))
        refit_data = TrainingData(data.raw, outer.refit, data.tags)
        fitted = train(refit_cfg, parent_run_id=run_id, data=refit_data,
                       run_tags={"outer_fold": str(outer.fold), "nested_cv": "refit"})
        result = {"fold": outer.fold, "trial_id": best["trial_id"], "overrides": best["overrides"],
                  f"inner/{best['metric']}": best["value"],  # the sweep's own score of its choice
                  **{f"outer/{k}": v for k, v in _score(data, outer.held_out, refit_cfg).items()},
                  **{f"test/{k}": v for k, v in _score(data, data.splits.test, refit_cfg).items()},
                  "model/params": fitted["model/params"], "model/macs": fitted["model/macs"],
                  "sizes": {"held_out": int(len(outer.held_out)), "refit_train": int(len(outer.refit.train)),
                            "refit_val": int(len(outer.refit.val))},
                  "sweep_run_id": best.get("mlflow_parent_run_id"), "outer_run_id": run_id}
        write_json(out / "metrics" / "outer.json", file_row(result))
        if run is not None:
            run.log_params({f"chosen.{k}": v for k, v in flatten(best["overrides"]).items()})
            run.log_metrics({k: float(v) for k, v in result.items() if k.startswith(("outer/", "test/", "inner/"))})
            run.set_tags({"chosen_trial": best["trial_id"]})
    return result


def nested_cross_validate(cfg: DictConfig, *, parent_run_id: str | None = None) -> dict[str, Any]:
    """Nested cross-validation of the configured sweep; writes `metrics/cv.json` and returns
    what it holds (keys as in the code: `outer/acc`)."""
    cfg = check_nested_cv(cfg)
    layout = Layout.from_cfg(cfg)
    data = load_data(cfg, layout)
    folds = list(range(cfg.data.split.folds))
    outers = [outer_fold(data.splits, data.raw.labels, fold=i, inner_folds=cfg.cv.inner_folds,
                         val_fraction=cfg.data.split.val_fraction) for i in folds]
    check_tracking(cfg.tracking, cfg.paths.root)
    parent = None
    if cfg.tracking.enabled:
        run_name = cfg.tracking.run_name or f"nested-cv-{cfg.name}-{cfg.model.name}-{cfg.data.name}"
        parent = TrackedRun.start(**tracking_target(cfg.tracking, cfg.paths.root), run_name=run_name,
                                  parent_run_id=parent_run_id,
                                  tags={"dataset": cfg.data.name, "model": cfg.model.name, "nested_cv": "true",
                                        "cv_folds": str(len(folds)), "inner_folds": str(cfg.cv.inner_folds)})
    import ray

    started = init_ray(to_container(cfg.tune))  # one Ray for every outer fold's sweep
    try:
        with parent if parent is not None else contextlib.nullcontext():
            if parent is not None:
                parent.log_params(flatten(to_container(cfg)))
            parent_id = parent.run_id if parent is not None else None
            results = [run_outer(cfg, outer, data, layout, parent_id) for outer in outers]
            out = _summary(cfg, results)
            write_json(layout.metrics / "cv.json", file_row(out))
            write_text(layout.root_out / "cv" / "nested" / "README.md", _readme(out))
            if parent is not None:
                parent.log_metrics({f"nested/{key}/{stat}": value for key, stats in out.items()
                                    if isinstance(stats, dict) and "mean" in stats
                                    for stat, value in stats.items() if stat in ("mean", "std", "ci_low", "ci_high")})
                parent.log_artifact(layout.metrics / "cv.json")
                out["mlflow_run_id"] = parent.run_id  # for the summary; not in cv.json
    finally:
        if started:
            ray.shutdown()
    return out


def _summary(cfg: DictConfig, results: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in results[0] if k.startswith(("outer/", "test/", "inner/"))]
    summary = {key: summarize([r[key] for r in results], confidence=cfg.cv.confidence) for key in keys}
    choices = [{"fold": r["fold"], "trial_id": r["trial_id"], "overrides": r["overrides"],
                **{k: r[k] for k in keys}, "sizes": r["sizes"]} for r in results]
    return {"nested": True, "folds": len(results), "inner_folds": cfg.cv.inner_folds,
            "confidence": cfg.cv.confidence, "model/params": results[0]["model/params"],
            "model/macs": results[0]["model/macs"], **summary, "choices": [file_row(c) for c in choices]}


def _readme(out: dict[str, Any]) -> str:
    acc = out["outer/acc"]
    lines = [f"# Nested cross-validation: {out['folds']} outer x {out['inner_folds']} inner folds", "",
             f"Tuned, then trained: outer-fold accuracy {acc['mean']:.4f} ± {acc['std']:.4f} "
             f"({out['confidence']:.0%} CI {acc['ci_low']:.4f}–{acc['ci_high']:.4f}).", "",
             "| outer fold | chosen | inner score | outer acc |", "|---|---|---|---|"]
    for c in out["choices"]:
        chosen = ", ".join(f"{k}={v}" for k, v in c["overrides"].items())
        inner = next((v for k, v in c.items() if k.startswith("inner_")), float("nan"))
        lines.append(f"| {c['fold']} | {chosen} | {inner:.4f} | {c['outer_acc']:.4f} |")
    return "\n".join(lines) + "\n"
