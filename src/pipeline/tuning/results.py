"""After the trials: pick the best, write `results/tune/`, finish the MLflow parent run."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from pipeline.config import plain
from pipeline.errors import STOPPED
from pipeline.files import save_figure, write_text
from pipeline.tracking.mlflow_run import tracking_target
from pipeline.training.metrics import LEARNING_CURVES, file_key, file_row
from pipeline.tuning.pareto import front_key, log_front, mark_front, objective_values, write_pareto
from pipeline.tuning.plan import Plan
from pipeline.tuning.selection import CORRECT_KEY, Candidate, Selection, explain, select, unpack
from pipeline.tuning.space import trial_config

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    trials: list[dict[str, Any]] = field(default_factory=list)   # one summary per trial
    curves: list[dict[str, Any]] = field(default_factory=list)   # one row per trial and epoch
    best: dict[str, Any] | None = None
    selection: Selection | None = None  # how `best` was picked among the trials


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rows(df: Any, key: str = "epoch") -> list[dict[str, Any]]:
    """A trial's reported results, one per epoch (or fold: `key`); a resumed trial re-reports
    some: keep the last."""
    if df is None or len(df) == 0 or key not in df:
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for row in df.to_dict("records"):
        if _finite(row.get(key)):
            by_step[int(row[key])] = row
    return [by_step[e] for e in sorted(by_step)]


def _summarize(plan: Plan, trial: Any, status: str, rows: list[dict[str, Any]], run_ids: dict[str, str]) -> dict[str, Any]:
    metric, sign = plan.tune["metric"], 1 if plan.tune["mode"] == "max" else -1
    diverged = any(r.get("diverged") == 1 for r in rows) or bool(trial.last_result.get("diverged"))
    scored = [r for r in rows if _finite(r.get(metric))] if not diverged else []
    if plan.tune.get("cv"):
        # The running mean after the last fold done: its k-fold score (the best of the running
        # means would favour a lucky first fold).
        best = scored[-1] if scored and scored[-1] is rows[-1] else None
    else:
        # The best epoch, as the train task's checkpoint picks it: ties go to the lower val/loss.
        best = max(scored, key=lambda r: (sign * r[metric], -r.get("val/loss", math.inf)), default=None)
    epochs = len(rows)
    step_key = plan.step_key
    if diverged:
        reason = "diverged"
    elif not rows:
        reason = "error" if status == "ERROR" else "no_result"  # e.g. tune.time_budget_s ran out
    elif status == "ERROR":
        reason = "error"
    elif max(epochs, trial.last_result.get("training_iteration", 0)) >= plan.steps:
        reason = "all_folds" if plan.tune.get("cv") else "max_epochs"
    elif status != "TERMINATED":
        reason = "unfinished"
    else:
        reason = "scheduler" if rows and rows[-1].get("done") else "early_stopping"
    node = next((r["node_ip"] for r in rows if isinstance(r.get("node_ip"), str)), "")
    return {"trial_id": trial.trial_id, "status": status, "config": dict(trial.config),
            "value": best[metric] if best else math.nan, "epoch": int(best[step_key]) if best else -1,
            "val/loss": best.get("val/loss", math.nan) if best else math.nan, "epochs": epochs,
            "diverged": diverged, "stop_reason": reason, "failures": trial.num_failures, "node": node,
            "run_id": run_ids.get(trial.trial_id, ""), "path": trial.path,
            "objectives": objective_values(best, plan.objectives),
            "correct": unpack(best.get(CORRECT_KEY)) if best else None}  # the best epoch's, for `select`


def collect(plan: Plan, path: str, *, all_ended: bool = False) -> Outcome:
    """Every trial's summary and curve from the experiment's saved state and result.json files.

    `all_ended`: Tune's own trials (in memory, after `fit`) all ended. The saved state can
    then still hold a trial PAUSED: a scheduler (HyperBand) that stops a paused trial whose
    actor is gone ends it without marking it for the next state save (Ray 2.60,
    `TuneController._schedule_trial_stop`), so the trial is TERMINATED, not unfinished."""
    from ray.tune import ExperimentAnalysis

    from pipeline.tuning.mlflow_tree import map_path, read_text

    analysis = ExperimentAnalysis(path, default_metric=plan.tune["metric"], default_mode=plan.tune["mode"])
    saved = read_text(map_path(path)) if plan.cfg.tracking.enabled else None
    ids = json.loads(saved) if saved else {"parent": None, "children": {}}
    outcome = Outcome()
    frames = analysis.trial_dataframes
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        rows = _rows(frames.get(trial.trial_id), plan.step_key)
        status = "TERMINATED" if all_ended and trial.status == "PAUSED" else trial.status
        outcome.trials.append(_summarize(plan, trial, status, rows, ids["children"]))
        for r in rows:
            # `step` is what dvc plots draws against: the epoch, or the fold with tune.cv.
            point = {"trial_id": trial.trial_id, "step": int(r[plan.step_key]), plan.step_key: int(r[plan.step_key])}
            point.update({k: r[k] if _finite(r.get(k)) else None for k in LEARNING_CURVES})
            outcome.curves.append(point)
    if plan.objectives:
        mark_front(outcome.trials, plan.objectives)
    candidates = [t for t in outcome.trials if _finite(t["value"])]
    if plan.tune.get("cv") and any(t["epochs"] == plan.steps for t in candidates):
        # A mean over every fold beats one over the first few (a trial ASHA stopped).
        candidates = [t for t in candidates if t["epochs"] == plan.steps]
    if plan.objectives:  # the front member best on the first objective (pipeline.tuning.pareto)
        candidates = [t for t in candidates if t["on_front"]]
    if candidates:
        if plan.objectives:  # the Pareto front's rule, not the one-metric selection
            best = max(candidates, key=lambda t: front_key(t, plan.objectives))
        else:
            best, outcome.selection = choose_best(plan.tune, candidates)
        overrides = {**plan.fixed, **best["config"]}
        config = trial_config(plan.base, best["config"], plan.blocks)
        config["paths"]["out_dir"] = best["path"]
        outcome.best = {
            "trial_id": best["trial_id"], "metric": plan.tune["metric"], "mode": plan.tune["mode"],
            "value": float(best["value"]), **({"folds": best["epochs"]} if plan.tune.get("cv") else {"epoch": best["epoch"]}),
            "val/loss": float(best["val/loss"]),
            **({"selection": outcome.selection.summary()} if outcome.selection else {}),
            "sweep": plan.tune["name"],
            "experiment": path, "mlflow_parent_run_id": ids["parent"], "mlflow_run_id": best["run_id"] or None,
            **({"objectives": best["objectives"],
                "pareto_front": [t["trial_id"] for t in outcome.trials if t["on_front"]]} if plan.objectives else {}),
            "overrides": plain(overrides),
            "config": OmegaConf.to_container(OmegaConf.create(config), resolve=True)}
    return outcome


def choose_best(tune: dict[str, Any], candidates: list[dict[str, Any]]) -> tuple[dict[str, Any], Selection]:
    """The trial summary to keep among `candidates` (`collect`'s, each with a finite value)
    by the `tune` block's metric, mode and selection rules (`pipeline.tuning.selection`),
    with a warning when the metric could not rank the trials it was picked among."""
    metric, rules = tune["metric"], tune["selection"]
    selection = select([Candidate(t["trial_id"], float(t["value"]), float(t["val/loss"]), t["correct"])
                        for t in candidates], metric=metric, mode=tune["mode"],
                       alpha=float(rules["alpha"]), tie_break=rules["tie_break"])
    if selection.saturated:
        log.warning("%s saturates on this validation split (%s), so it cannot rank these trials: %s. A k-fold "
                    "mean (tune.cv=true) or a larger validation split ranks them on more samples.",
                    metric, selection.saturated, explain(selection, metric))
    elif selection.chosen != selection.top:
        log.warning("%s.", explain(selection, metric))
    return next(t for t in candidates if t["trial_id"] == selection.chosen), selection


def write_outputs(plan: Plan, outcome: Outcome, *, final: bool = True) -> None:
    """trials.csv, curves.json/png, and best.yaml (only for a sweep that ran to its end)."""
    out = plan.results
    out.mkdir(parents=True, exist_ok=True)
    keys = list(plan.space)
    metric = file_key(plan.tune["metric"])
    # With tune.cv a trial's score is the mean over its folds, and it counts folds, not epochs.
    columns = ([f"cv_{metric}", "last_fold", "folds"] if plan.tune.get("cv")
               else [f"best_{metric}", "best_epoch", "epochs"])
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    # val_loss: at the best epoch (the folds' mean with tune.cv), the tie-break among trials
    # the validation split cannot tell apart (`indistinguishable`: 1 when `mcnemar_p` >= alpha
    # against the top trial, or tied exactly; `selected`: the trial best.yaml keeps).
    writer.writerow(["trial_id", "status", *keys, *columns, "diverged",
                     "stop_reason", "failures", "node", "mlflow_run_id", "val_loss", "mcnemar_p",
                     "indistinguishable", "selected"])
    chosen = outcome.selection
    for t in outcome.trials:
        p = chosen.p_values.get(t["trial_id"]) if chosen else None
        writer.writerow([t["trial_id"], t["status"], *(plain(t["config"].get(k, "")) for k in keys),
                         t["value"], t["epoch"], t["epochs"], int(t["diverged"]), t["stop_reason"],
                         t["failures"], t["node"], t["run_id"], t["val/loss"], "" if p is None else p,
                         int(t["trial_id"] in chosen.indistinguishable) if chosen else "",
                         int(t["trial_id"] == chosen.chosen) if chosen else ""])
    write_text(out / "trials.csv", table.getvalue())
    write_text(out / "curves.json", json.dumps([file_row(c) for c in outcome.curves], indent=1) + "\n")
    curves_png(outcome, plan.tune["metric"], out / "curves.png", plan.step_key)
    if plan.objectives:
        write_pareto(out, outcome.trials, plan.objectives, keys)
    else:  # a multi-objective sweep's, not this one's
        for name in ("pareto.csv", "pareto.png"):
            (out / name).unlink(missing_ok=True)
    best_file = out / "best.yaml"
    if outcome.best is not None and final:
        header = ("# The best trial of the last sweep (pipeline tune / the DVC tune stage). The train\n"
                  "# stage applies `overrides` (group keys take their block from `config`) when tune.use_best.\n")
        if plan.objectives:
            header += ("# Several objectives (tune.objectives): the trial on the Pareto front (pareto.csv) best on\n"
                       "# the first objective, ties broken by the next objectives in order, then val/loss.\n")
        # Whole or not at all (a driver killed while writing): the train stage reads it.
        write_text(best_file, header + yaml.safe_dump(plain(outcome.best), sort_keys=False))
    else:
        best_file.unlink(missing_ok=True)


def curves_png(outcome: Outcome, metric: str, path: Path, step_key: str = "epoch") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = outcome.best["trial_id"] if outcome.best else None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for t in outcome.trials:
        # Steps are stored from 0, as Lightning counts epochs; drawn from 1, as the summaries
        # and the report count them (epoch 1 is the first; with tune.cv, folds done so far).
        points = [(c["step"] + 1, c[metric]) for c in outcome.curves
                  if c["trial_id"] == t["trial_id"] and c[metric] is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, lw=2.5 if t["trial_id"] == best else 1, alpha=1 if t["trial_id"] == best else 0.6,
                    label=f"{t['trial_id']}{' (best)' if t['trial_id'] == best else ''}")
    ax.set_xlabel(step_key if step_key == "epoch" else f"{step_key}s so far")
    ax.set_ylabel(metric if step_key == "epoch" else f"{metric}, mean of the folds so far")
    ax.set_title(f"{metric} of every trial")
    ax.grid(alpha=0.3)
    if ax.lines:  # every trial diverged: nothing to draw
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def finish_parent(plan: Plan, outcome: Outcome, path: str, *, interrupted: bool, elapsed: float) -> None:
    """Tag the parent with the best trial, attach the table and curves, and end the tree:
    children still RUNNING become KILLED; the parent FINISHED (KILLED if interrupted)."""
    from pipeline.tuning.mlflow_tree import SweepRuns, map_path

    runs = SweepRuns(tracking_target(plan.cfg.tracking, plan.cfg.paths.root), map_path(path))
    parent = runs.parent
    if parent is None:
        return
    metric = plan.tune["metric"]
    for t in outcome.trials:
        child = runs.child(t["trial_id"])
        if child is not None and _finite(t["value"]):
            score = f"cv/{metric}" if plan.tune.get("cv") else f"best/{metric}"  # k-fold mean, or best epoch
            child.log_metrics({score: t["value"], f"{plan.step_key}s": t["epochs"]})
    runs.end_open_children("KILLED")
    parent.log_metrics({"time/sweep_s": elapsed, "trials": len(outcome.trials)})
    for name in ("trials.csv", "curves.json", "curves.png", "best.yaml"):
        if (plan.results / name).exists():
            parent.log_artifact(plan.results / name)
    if plan.objectives:
        log_front(runs, plan.results, outcome.trials, plan.objectives)
    if outcome.best is not None:
        parent.set_tags({"best_trial_id": outcome.best["trial_id"], f"best_{metric}": f"{outcome.best['value']:.6g}",
                         "best_run_id": outcome.best["mlflow_run_id"] or ""})
        parent.log_metrics({f"best/{metric}": outcome.best["value"]})
    if outcome.selection is not None:
        _log_selection(runs, outcome.selection)
    if interrupted:
        parent.set_tags({"interrupted": "true"})
    parent.finish("KILLED" if interrupted else "FINISHED")


def _log_selection(runs: Any, selection: Selection) -> None:
    """The parent's tags say how the best trial was picked; each child whether it is
    indistinguishable from the top trial (and its McNemar p-value against it)."""
    tied = selection.indistinguishable
    runs.parent.set_tags({"top_trial_id": selection.top, "selection_test": selection.test,
                          "selection_tie_break": selection.tie_break,
                          "indistinguishable_trials": ",".join(tied)[:5000],
                          "saturated": selection.saturated or "false"})
    runs.parent.log_metrics({"selection/indistinguishable": len(tied), "selection/alpha": selection.alpha,
                             **({"selection/n_val": selection.n_val} if selection.n_val else {})})
    for trial_id, p in selection.p_values.items():
        child = runs.child(trial_id)
        if child is not None:
            child.set_tags({"indistinguishable_from_top": str(trial_id in tied).lower(),
                            "selected": str(trial_id == selection.chosen).lower()})
            if p is not None:
                child.log_metrics({"selection/mcnemar_p": p})


def abort_tree(plan: Plan, path: str, error: BaseException) -> None:
    """After a crash of the driver's sweep loop: nothing of the tree may stay RUNNING."""
    from pipeline.tuning.mlflow_tree import SweepRuns, map_path

    try:
        runs = SweepRuns(tracking_target(plan.cfg.tracking, plan.cfg.paths.root), map_path(path))
    except Exception:  # noqa: BLE001 - nothing was created
        return
    runs.end_open_children("KILLED")
    if runs.parent is not None:
        runs.parent.set_tags({"error": f"{type(error).__name__}: {error}"[:5000]})
        runs.parent.finish("KILLED" if isinstance(error, STOPPED) else "FAILED")
