"""Accuracy against cost: Pareto fronts of a multi-objective sweep (`tune.objectives`).

A point dominates another when it is at least as good on every objective and strictly
better on at least one. The front is every point no other point dominates. Two equal points
do not dominate each other, so duplicates on the front are all kept; a point with a missing
(NaN) objective is never on the front and dominates nothing.

A multi-objective sweep writes `results/tune/pareto.csv` (every trial, its objectives and
`on_front`) and `pareto.png`, and logs the front on the MLflow parent. Its `best.yaml` is the
front member best on the first objective (ties broken by the next objectives in order, then
val/loss): the most accurate design on the front, and the one the train stage then trains.
This module imports neither Ray nor torch at import time: `non_dominated` also serves the
compare task.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import plain
from pipeline.errors import ConfigError
from pipeline.files import save_figure, write_text
from pipeline.training.metrics import LEARNING_CURVES, file_key

log = logging.getLogger(__name__)

# What a trial measures of its model (trial.py reports them with every epoch): parameter
# elements, multiply-accumulates per image (`pipeline.models.count_macs`), and the median
# inference time per image in milliseconds (`pipeline.models.measure_latency`).
COSTS = ("model/params", "model/macs", "model/latency_ms")
OBJECTIVE_METRICS = (*LEARNING_CURVES, *COSTS)
FORM = "a list of {metric: max|min}, e.g. [{val/acc: max}, {model/macs: min}]"

Objective = tuple[str, str]  # (metric, "max" | "min")


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """`a` is at least as good as `b` on every objective and strictly better on one (NaN: never)."""
    if any(math.isnan(x) for x in (*a, *b)):
        return False
    better = False
    for x, y, mode in zip(a, b, modes, strict=True):
        if mode == "min":
            x, y = -x, -y
        if x < y:
            return False
        better |= x > y
    return better


def non_dominated(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[bool]:
    """For each point, whether no other point dominates it (and it has no NaN objective).
    Quadratic in the number of points: a sweep has tens or hundreds of trials."""
    values = [tuple(float(v) for v in p) for p in points]
    for p in values:
        if len(p) != len(modes):
            raise ValueError(f"point {p} has {len(p)} objectives, modes {list(modes)} has {len(modes)}")
    return [not any(math.isnan(v) for v in p) and not any(dominates(q, p, modes) for q in values)
            for p in values]


def parse_objectives(node: Any) -> list[Objective]:
    """`tune.objectives` as [(metric, mode), ...] in order; [] when unset (one objective:
    tune.metric). Accepts the list form and, in a YAML file, one ordered mapping."""
    if node is None or (isinstance(node, (list, tuple, Mapping)) and not node):
        return []
    entries = [{k: v} for k, v in node.items()] if isinstance(node, Mapping) else node
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(f"tune.objectives={node!r}: use {FORM}.")
    out: list[Objective] = []
    for entry in entries:
        if not isinstance(entry, Mapping) or len(entry) != 1:
            raise ConfigError(f"tune.objectives: {entry!r} is not one {{metric: max|min}}; use {FORM}.")
        (metric, mode), = entry.items()
        if metric not in OBJECTIVE_METRICS:
            raise ConfigError(f"tune.objectives: unknown metric {metric!r}; choose from {', '.join(OBJECTIVE_METRICS)}.")
        if mode not in ("max", "min"):
            raise ConfigError(f"tune.objectives: {metric}: {mode!r} must be max or min.")
        if metric in (m for m, _ in out):
            raise ConfigError(f"tune.objectives lists {metric} twice: keep one entry.")
        out.append((metric, mode))
    if len(out) == 1:
        raise ConfigError(f"tune.objectives has one objective ({out[0][0]}): set tune.metric and tune.mode instead, "
                          "or add a cost, e.g. [{val/acc: max}, {model/macs: min}].")
    if out[0][0] not in LEARNING_CURVES:
        raise ConfigError(f"tune.objectives starts with {out[0][0]}: the first objective picks each trial's epoch and "
                          f"best.yaml, so it must be one of {', '.join(LEARNING_CURVES)}; "
                          "e.g. [{val/acc: max}, {model/macs: min}].")
    return out


def check_multi_objective(tune: dict[str, Any], objectives: list[Objective]) -> None:
    """Refuse what cannot rank trials on several objectives; ASHA and HyperBand stop trials on
    one metric, so the sweep falls back to FIFO (every trial runs its epochs) and says so.
    Rewrites `tune` (the plan's resolved block): metric and mode become the first objective."""
    if tune["scheduler"] == "pbt":
        raise ConfigError("tune.objectives with tune.scheduler=pbt: PBT clones the trials that are best on one metric; "
                          "use tune.scheduler=fifo.")
    if tune.get("cv"):
        raise ConfigError("tune.objectives with tune.cv=true: a cross-validated trial reports no model costs yet; "
                          "set tune.cv=false.")
    if tune["workers"] > 1:
        raise ConfigError("tune.objectives with tune.workers > 1: a DDP trial reports no model costs yet; "
                          "set tune.workers=1.")
    if tune["scheduler"] in ("asha", "hyperband"):
        log.warning("tune.objectives: tune.scheduler=%s stops trials on one metric and cannot prune on %d objectives; "
                    "this sweep runs every trial to its end (fifo). Set tune.scheduler=fifo to silence this.",
                    tune["scheduler"], len(objectives))
        tune["scheduler"] = "fifo"
    first, mode = objectives[0]
    if (tune.get("metric"), tune.get("mode")) != (first, mode):
        log.info("tune.objectives: the sweep picks each trial's epoch and best.yaml by its first objective, "
                 "%s (%s), in place of tune.metric=%s.", first, mode, tune.get("metric"))
    tune.update(metric=first, mode=mode, objectives=[{m: d} for m, d in objectives])


def objective_values(row: Mapping[str, Any] | None, objectives: Sequence[Objective]) -> dict[str, float]:
    """Each objective's value in a trial's best reported row (NaN if missing)."""
    out = {}
    for metric, _ in objectives:
        value = (row or {}).get(metric)
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        out[metric] = float(value) if finite else math.nan
    return out


def mark_front(trials: list[dict[str, Any]], objectives: Sequence[Objective]) -> None:
    """Set each trial summary's `on_front` (from its `objectives` values)."""
    points = [[t["objectives"][m] for m, _ in objectives] for t in trials]
    for t, on in zip(trials, non_dominated(points, [d for _, d in objectives])):
        t["on_front"] = on


def front_key(trial: Mapping[str, Any], objectives: Sequence[Objective]) -> tuple[float, ...]:
    """best.yaml's order among front members: each objective in turn, then the lower val/loss."""
    signed = [(v if d == "max" else -v) for (m, d) in objectives for v in [trial["objectives"][m]]]
    loss = trial.get("val/loss", math.nan)
    return (*signed, -loss if math.isfinite(loss) else -math.inf)


def cost_probe(plain_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What a trial measures of its model (`measure_costs`' arguments): the input shape, and
    the latency batch when model/latency_ms is an objective (timing costs seconds; the rest
    is one forward pass)."""
    data = plain_cfg["data"]
    objectives = parse_objectives((plain_cfg.get("tune") or {}).get("objectives"))
    latency = any(m == "model/latency_ms" for m, _ in objectives)
    return {"input_shape": (int(data["channels"]), int(data["image_size"]), int(data["image_size"])),
            "latency_batch": int(data["eval_batch_size"]) if latency else None}


def measure_costs(net: Any, *, input_shape: tuple[int, int, int], latency_batch: int | None) -> dict[str, float]:
    """model/params, model/macs (as the train task counts them) and, with `latency_batch`,
    model/latency_ms."""
    from pipeline.models import count_macs, count_parameters, measure_latency

    out = {"model/params": float(count_parameters(net)), "model/macs": float(count_macs(net, input_shape))}
    if latency_batch:
        out["model/latency_ms"] = measure_latency(net, input_shape, batch_size=latency_batch)
    return out


# ----------------------------------------------------------------------------------- outputs

def write_pareto(folder: Path, trials: Sequence[Mapping[str, Any]], objectives: Sequence[Objective],
                 keys: Sequence[str]) -> None:
    """`pareto.csv` (every trial: its sampled `keys`, objectives and `on_front`) and `pareto.png`."""
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["trial_id", "status", *keys, *(file_key(m) for m, _ in objectives), "on_front", "mlflow_run_id"])
    for t in trials:
        writer.writerow([t["trial_id"], t["status"], *(plain(t["config"].get(k, "")) for k in keys),
                         *(t["objectives"][m] for m, _ in objectives), int(t["on_front"]), t.get("run_id", "")])
    write_text(folder / "pareto.csv", table.getvalue())
    pareto_png(trials, objectives, folder / "pareto.png")


def pareto_png(trials: Sequence[Mapping[str, Any]], objectives: Sequence[Objective], path: Path) -> Path:
    """The first objective against each other one, one panel each: every trial, the front
    (of all objectives) highlighted and labelled, joined in the order of the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (y_name, y_mode), others = objectives[0], objectives[1:]
    fig, axes = plt.subplots(1, len(others), figsize=(5.5 * len(others), 4.5), dpi=100, squeeze=False)
    for ax, (x_name, x_mode) in zip(axes[0], others):
        points = [(t["objectives"][x_name], t["objectives"][y_name], t) for t in trials]
        points = [p for p in points if math.isfinite(p[0]) and math.isfinite(p[1])]
        rest = [p for p in points if not p[2]["on_front"]]
        front = sorted((p for p in points if p[2]["on_front"]), key=lambda p: p[0])
        if rest:
            ax.scatter([p[0] for p in rest], [p[1] for p in rest], c="tab:gray", alpha=0.6, label="trial")
        if front:
            # Lower cost, higher score: the edge of what the front attains is a staircase.
            style = "steps-post" if (x_mode, y_mode) == ("min", "max") else "default"
            ax.plot([p[0] for p in front], [p[1] for p in front], "o-", c="tab:red", drawstyle=style,
                    label="Pareto front")
            for x, y, t in front:
                names = " ".join(str(v) for v in t["config"].values() if isinstance(v, str))  # e.g. the model
                ax.annotate(f"{t['trial_id']} {names}".strip(), (x, y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        xs = [p[0] for p in points]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:  # parameters and MACs span decades
            ax.set_xscale("log")
        ax.set_xlabel(f"{x_name} ({'lower' if x_mode == 'min' else 'higher'} is better)")
        ax.set_ylabel(f"{y_name} ({'higher' if y_mode == 'max' else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.12, y=0.08)  # room for the labels of the outermost points
        if points:
            ax.legend(fontsize=8)
    fig.suptitle(f"{len(trials)} trials, {sum(bool(t['on_front']) for t in trials)} on the front")
    return save_figure(fig, path)


def log_front(runs: Any, folder: Path, trials: Sequence[Mapping[str, Any]], objectives: Sequence[Objective]) -> None:
    """On the sweep's MLflow tree (`mlflow_tree.SweepRuns`): the parent gets pareto.csv and
    .png, the front as a table (`pareto_front.json`, MLflow's columns/data form) and tags
    naming its trials; each child gets its objectives as metrics and an `on_front` tag."""
    parent = runs.parent
    names = [m for m, _ in objectives]
    front = [t for t in trials if t["on_front"]]
    for t in trials:
        child = runs.child(t["trial_id"])
        if child is not None:
            values = {m: v for m, v in t["objectives"].items() if math.isfinite(v) and m in COSTS}
            if values:
                child.log_metrics(values)
            child.set_tags({"on_front": str(bool(t["on_front"])).lower()})
    for name in ("pareto.csv", "pareto.png"):
        if (folder / name).exists():
            parent.log_artifact(folder / name)
    parent.log_dict({"columns": ["trial_id", *names, "mlflow_run_id"],
                     "data": [[t["trial_id"], *(t["objectives"][m] for m in names), t.get("run_id", "")]
                              for t in front]}, "pareto_front.json")
    parent.set_tags({"objectives": ", ".join(f"{m}:{d}" for m, d in objectives),
                     "pareto_front": ",".join(t["trial_id"] for t in front)[:5000],
                     "pareto_front_size": str(len(front))})
