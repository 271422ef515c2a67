"""The compare task: cross-validate a grid of named alternatives under the same folds and
seeds, then test which differences are real.

Alternatives come from `compare.grid`, a list of {key: [values]}, e.g.
`[{model: [mlp, lenet5]}, {regularizer: [none, dropout]}]` gives four alternatives. Each is
cross-validated (same split, same folds, same seed; with parallel folds, every alternative's
folds in one batch of Ray tasks), then compared by
`pipeline.analysis.stats.compare_alternatives`: the corrected resampled t-test, paired
t-test and Wilcoxon over folds (and the 5x2cv t-test on 5 repetitions of 2 folds), McNemar
on the shared test set (each alternative predicts with its fold models' mean probabilities),
Holm-corrected. `compare.test` picks the one that decides; the report says which and why.
`compare_cost.png` plots each alternative's mean score and interval against its parameters
and MACs, marking the non-dominated ones.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.analysis.stats import FAMILIES, LABELS, compare_alternatives
from pipeline.config import fold_config, fold_count, to_container
from pipeline.data.splits import load_splits
from pipeline.data.store import read_raw
from pipeline.errors import ConfigError
from pipeline.files import save_figure, write_text
from pipeline.layout import Layout
from pipeline.tasks.common import write_json
from pipeline.tasks.fold_pool import ProcessPool
from pipeline.tracking.mlflow_run import TrackedRun, tracking_target
from pipeline.tracking.server import check_tracking
from pipeline.training.metrics import best_epoch, read_curves
from pipeline.training.regularizers.early_stopping import still_improving
from pipeline.tuning.pareto import non_dominated
from pipeline.tuning.space import GROUPS, apply_overrides, compose_block
from pipeline.validation import prepare, refuse_resume

log = logging.getLogger(__name__)


def alternatives(grid: list[dict[str, list]] | dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in a stable order. The grid is a list of
    single-key mappings (the config's form, which Hydra can override whole) or one mapping."""
    if isinstance(grid, list):
        grid = {k: v for entry in grid for k, v in entry.items()}
    keys = list(grid)
    for key in keys:
        if not isinstance(grid[key], list) or not grid[key]:
            raise ConfigError(f"compare.grid.{key} must be a non-empty list of alternatives.")
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _label(alt: dict[str, Any]) -> str:
    return ",".join(f"{v}" if k in ("model", "regularizer", "optimizer", "scheduler") else f"{k}={v}"
                    for k, v in alt.items())


def design_metric(label: str, metric: str) -> str:
    """The comparison run's metric of one design's mean in the characters MLflow allows in a
    name: `lenet5,optimizer.lr=0.01` -> `design/lenet5 optimizer.lr:0.01/val/acc/mean`."""
    name = label.replace(",", " ").replace("=", ":")
    return f"design/{re.sub(r'[^A-Za-z0-9_.: -]', '_', name)}/{metric}/mean"


def _alternative_config(cfg: DictConfig, alt: dict[str, Any], out_dir: Path) -> DictConfig:
    """The base config with this alternative applied: group choices (model=lenet5,
    regularizer=[none,dropout]) swap in the composed group, other keys are set as given."""
    blocks = {k: {str(v): compose_block(k, _hydra_value(v), "compare.grid")} for k, v in alt.items() if k in GROUPS}
    alt_cfg = OmegaConf.create(apply_overrides(to_container(cfg), alt, blocks))
    with open_dict(alt_cfg):
        alt_cfg.paths.out_dir = str(out_dir)
        alt_cfg.tracking.run_name = _label(alt)
    return alt_cfg


def _hydra_value(value: Any) -> str:
    return f"[{','.join(map(str, value))}]" if isinstance(value, list) else str(value)


def _plan(cfg: DictConfig) -> tuple[DictConfig, list[tuple[str, Path, DictConfig]]]:
    """The prepared config and every alternative's (label, output folder, prepared config):
    all validated before the first one trains, so a bad alternative fails in seconds, with
    no run started."""
    cfg = prepare(cfg)
    refuse_resume(cfg, "a comparison")
    folds, repeats = cfg.data.split.folds, cfg.cv.repeats
    if cfg.compare.test == "five_by_two" and (folds, repeats) != (2, 5):
        raise ConfigError(f"compare.test=five_by_two is Dietterich's 5x2cv test: it needs data.split.folds=2 and "
                          f"cv.repeats=5, got data.split.folds={folds} and cv.repeats={repeats}. Add "
                          "`data.split.folds=2 cv.repeats=5` (the split stage remakes the folds), or use "
                          "compare.test=corrected_t, which takes any folds and repetitions.")
    layout = Layout.from_cfg(cfg)
    planned = []
    for alt in alternatives(OmegaConf.to_container(cfg.compare.grid)):
        label = _label(alt)
        out = layout.root_out / "compare" / label.replace(",", "__").replace("=", "-")
        try:
            planned.append((label, out, prepare(_alternative_config(cfg, alt, out))))
        except ConfigError as err:
            raise ConfigError(f"compare.grid: the alternative {label} fails: "
                              f"{str(err).removeprefix('compare.grid: ')}") from err
    return cfg, planned


def check_compare(cfg: DictConfig) -> DictConfig:
    """Validate the base config and every alternative of the grid; the prepared config."""
    return _plan(cfg)[0]


def compare(cfg: DictConfig) -> dict[str, Any]:
    """Run the grid; writes reports/compare.md, reports/compare.json, a per-fold plot and the
    accuracy-against-cost figure."""
    from pipeline.tasks.cv import FOLD_SECONDS, fold_ray, local_fold_pool, parallel_folds

    cfg, planned = _plan(cfg)
    check_tracking(cfg.tracking, cfg.paths.root)
    layout = Layout.from_cfg(cfg)
    reports = layout.root_out / "reports"
    # Parallel folds: one pool of workers (or one Ray) for every alternative, whose workers keep
    # their imports; the pool's start before the MLflow runs', so that the two overlap.
    folds = fold_count(cfg) * len(planned)
    parallel = parallel_folds(cfg.cv, cfg.tune, folds)
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(local_fold_pool(cfg, folds)) if parallel else None
        parent = TrackedRun.start(**tracking_target(cfg.tracking, cfg.paths.root),
                                  run_name=f"compare-{cfg.name}-{cfg.data.name}",
                                  tags={"dataset": cfg.data.name, "compare": "true"}) if cfg.tracking.enabled else None
        if parent is not None:
            stack.enter_context(parent)
        if parallel and pool is None:
            stack.enter_context(fold_ray(cfg, folds))
        scores, probs, extra = {}, {}, {}
        results = _cross_validate_all([alt_cfg for _, _, alt_cfg in planned], parent.run_id if parent else None,
                                      parallel=parallel, pool=pool)
        for (label, _out, alt_cfg), result in zip(planned, results):
            scores[label] = result[cfg.compare.metric]["values"]
            fold_probs = [np.load(Path(fold_config(alt_cfg, i).paths.out_dir) / "metrics" / "test_probs.npy")
                          for i in range(len(scores[label]))]
            probs[label] = np.mean(fold_probs, axis=0).argmax(axis=1)
            extra[label] = {"params": result["model/params"], "macs": result["model/macs"], "time_s": result[FOLD_SECONDS],
                            "single_test_acc": result["test/acc"]["mean"],
                            "ensemble_test_acc": result["ensemble/test/acc"],
                            **training_budget(alt_cfg, [Path(fold_config(alt_cfg, i).paths.out_dir)
                                                       for i in range(len(scores[label]))])}
        raw = read_raw(layout.raw, in_memory=False)  # the labels are all it needs
        splits = load_splits(layout.splits)
        labels = raw.labels[splits.test]
        # The corrected t-test's n_test / n_train: a fold's validation and training sizes. With
        # compare.metric=test/* every fold model scores the same test split, which correlates
        # the fold differences further than this allows for: prefer val/* to decide.
        trainval = len(splits.train) + len(splits.val)
        n_test = float(np.mean([len(f) for f in splits.folds]))
        stats = compare_alternatives(scores, probs, labels, alpha=cfg.compare.alpha,
                                     confidence=cfg.cv.confidence, higher_is_better=cfg.compare.higher_is_better,
                                     test=cfg.compare.test, repeats=cfg.cv.repeats,
                                     n_train=trainval - n_test, n_test=n_test)
        stats["extra"] = extra
        stats["cost_front"] = cost_fronts(stats["summaries"], extra, higher_is_better=cfg.compare.higher_is_better)
        stats["budget_warnings"] = budget_warnings(extra)
        for warning in stats["budget_warnings"]:
            log.warning(warning)
        if parent is not None:  # each design's mean on the comparison's own run page (its CV runs: cv/*/mean)
            parent.log_metrics({design_metric(label, cfg.compare.metric): summary["mean"]
                                for label, summary in stats["summaries"].items()})
        if parent is not None and stats["budget_warnings"]:
            parent.set_tags({"still_improving": ",".join(n for n, e in extra.items() if e["still_improving"])})
        write_json(reports / "compare.json", stats)
        write_text(reports / "compare.md", markdown(stats, cfg.compare.metric))
        per_fold_png(scores, cfg.compare.metric, reports / "compare_folds.png")
        cost_png(stats, cfg.compare.metric, reports / "compare_cost.png")
        if parent is not None:
            for name in ("compare.md", "compare.json", "compare_folds.png", "compare_cost.png"):
                parent.log_artifact(reports / name)
            stats["mlflow_run_id"] = parent.run_id  # for the summary; compare.json is written
    return stats


def _cross_validate_all(cfgs: list[DictConfig], parent_run_id: str | None, *, parallel: bool,
                        pool: ProcessPool | None = None) -> list[dict[str, Any]]:
    """Each alternative's `cross_validate` result, its CV run a child of `parent_run_id`.
    Parallel folds go to `pool` (else Ray) as one batch, every alternative's side by side (so
    no core waits at the end of each alternative's last round); else one alternative after
    another."""
    from pipeline.tasks.cv import CrossValidation, cross_validate, run_parallel

    if not parallel:
        return [cross_validate(alt_cfg, parent_run_id=parent_run_id) for alt_cfg in cfgs]
    runs = [CrossValidation(alt_cfg, parent_run_id=parent_run_id) for alt_cfg in cfgs]
    stacks: list[contextlib.ExitStack] = []  # each holds an alternative's CV run open
    try:
        for run in runs:
            stacks.append(stack := contextlib.ExitStack())
            stack.enter_context(run)
        jobs, loaded = [], {}
        for run in runs:  # on Ray, the data read once for the alternatives that share it
            key = (run.layout.raw, run.layout.splits)
            jobs.append(job := run.job(loaded.get(key), load=pool is None))
            loaded[key] = job.data
        run_parallel(jobs, pool)
        results: list[dict[str, Any]] = []
        failure: Exception | None = None
        for run, job, stack in zip(runs, jobs, stacks):
            try:
                with stack:  # ends the alternative's CV run: FINISHED, or FAILED by its fold's error
                    results.append(run.finish(job.results(), job.data))
            except Exception as err:  # the others still finish; the first failure is raised
                failure = failure or err
        if failure is not None:
            raise failure
        return results
    except BaseException as err:
        for stack in stacks:  # the runs still open (a stop signal): KILLED, as their folds were
            stack.__exit__(type(err), err, err.__traceback__)
        raise


def training_budget(cfg: DictConfig, fold_dirs: list[Path]) -> dict[str, Any]:
    """Each fold's epochs run and best epoch, and the folds still improving at their last
    epoch (`still_improving`: the epoch budget, not early stopping, ended them)."""
    stop = cfg.regularizer.early_stopping
    epochs, best, improving = [], [], []
    for fold, folder in enumerate(fold_dirs):
        rows = [r for r in read_curves(folder / "plots" / "train_curves.json") if cfg.optimized_metric in r]
        values = [r[cfg.optimized_metric] for r in rows]
        ties = [r.get("val/loss", math.inf) for r in rows]
        epochs.append(len(values))
        best.append(best_epoch(values, ties))
        if still_improving(values, max_epochs=cfg.trainer.max_epochs, patience=stop.patience, min_delta=stop.min_delta):
            improving.append(fold)
    return {"input_px": int(cfg.data.resize or cfg.data.image_size), "max_epochs": int(cfg.trainer.max_epochs),
            "patience": int(stop.patience),
            "early_stopping": bool(stop.enabled), "epochs": epochs, "best_epoch": best, "still_improving": improving}


def budget_warnings(extra: dict[str, dict[str, Any]]) -> list[str]:
    """One line per alternative with folds still improving at their last epoch."""
    lines = []
    for name, e in extra.items():
        if not e["still_improving"]:
            continue
        folds = ", ".join(map(str, e["still_improving"]))
        why = "so early stopping had not ended it" if e["early_stopping"] else "(early stopping is off)"
        lines.append(f"{name} was still improving at its last epoch in {len(e['still_improving'])} of {len(e['epochs'])} "
                     f"folds ({folds}): all {e['max_epochs']} epochs ran and it last improved within the last "
                     f"{max(e['patience'], 1)}, {why}. Its score measures the epoch budget, not the design: "
                     "raise trainer.max_epochs until early stopping ends every fold.")
    return lines


def budget_markdown(stats: dict[str, Any]) -> list[str]:
    """The training-budget section of compare.md: epochs per fold, then the warnings."""
    lines = ["## Training budget", "", "| alternative | input (px) | epochs run per fold (best epoch) | max_epochs "
             "| ended before max_epochs |", "|---|---|---|---|---|"]
    for name, e in stats["extra"].items():
        # best_epoch is stored 0-based (Lightning's count); a reader counts epochs from 1
        runs = ", ".join(f"{n} ({b + 1})" for n, b in zip(e["epochs"], e["best_epoch"]))
        stopped = sum(n < e["max_epochs"] for n in e["epochs"])
        lines.append(f"| {name} | {e['input_px']} | {runs} | {e['max_epochs']} | {stopped} of {len(e['epochs'])} |")
    warnings = stats.get("budget_warnings") or []
    lines += ["", *(f"- **Warning:** {w}" for w in warnings)] if warnings else [
        "", "No alternative was still improving at its last epoch (every fold ended before max_epochs, or had not "
        "improved over its last `patience` epochs): the scores compare designs, not epoch budgets."]
    return [*lines, ""]


def markdown(stats: dict[str, Any], metric: str) -> str:
    """A table a person can read, then the pairwise tests and plain statements."""
    folds = f"{stats['folds']} folds" + (f" x {stats['repeats']} repetitions" if stats["repeats"] > 1 else "")
    lines = [f"# Comparison on {metric} ({folds}, alpha {stats['alpha']}, Holm-corrected)", "",
             f"Decided by the {stats['decision_reason']} The other tests are shown for reference.", "",
             "| alternative | mean ± std | 95% CI | parameters | MACs | training time (s, folds summed) "
             "| test acc: mean single fold | test acc: fold ensemble |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in stats["summaries"].items():
        e = stats["extra"][name]
        accs = " | ".join(f"{e[k]:.4f}" if k in e else "-" for k in ("single_test_acc", "ensemble_test_acc"))
        lines.append(f"| {name} | {s['mean']:.4f} ± {s['std']:.4f} | {s['ci_low']:.4f} – {s['ci_high']:.4f} | "
                     f"{int(e['params']):,} | {int(e['macs']):,} | {e['time_s']:.1f} | {accs} |")
    lines += ["", "The fold ensemble averages the softmax outputs of an alternative's fold models on the test "
              "split (as He et al. 2016 report their ensembles); beside it, the mean test accuracy of those "
              "models one at a time."]
    # Every test computed for these folds, the deciding one first and marked.
    shown = [f for f in (stats["deciding_key"], *FAMILIES) if any(p.get(f) for p in stats["pairs"])]
    shown = list(dict.fromkeys(shown))
    heads = [f"{LABELS[f]} p (Holm){' — decides' if f == stats['deciding_key'] else ''}" for f in shown]
    lines += ["", f"| A | B | mean diff | {' | '.join(heads)} | effect (d_z) |", "|---" * (len(heads) + 4) + "|"]
    for pair in stats["pairs"]:
        cells = [f"{r['p_value']:.3g} ({r['p_adjusted']:.3g})" if (r := pair.get(f)) else "-" for f in shown]
        lines.append(f"| {pair['a']} | {pair['b']} | {pair['mean_diff']:+.4f} | {' | '.join(cells)} "
                     f"| {pair['t_test']['cohens_dz']:.2f} |")
    lines += ["", *budget_markdown(stats)]
    lines += ["## Conclusions", "", *[f"- {s}" for s in stats["statements"]], ""]
    if "cost_front" in stats:
        front = stats["cost_front"]
        lines += ["## Accuracy against cost", "",
                  "Non-dominated alternatives (no other has a better mean at no greater cost): "
                  f"against parameters {', '.join(front['params'])}; against MACs {', '.join(front['macs'])}.", "",
                  f"![mean {metric} with its interval against parameters and MACs](compare_cost.png)", ""]
    return "\n".join(lines)


def cost_fronts(summaries: dict[str, dict[str, float]], extra: dict[str, dict[str, float]], *,
                higher_is_better: bool) -> dict[str, list[str]]:
    """{"params": [...], "macs": [...]}: the alternatives whose mean score no other beats at
    no greater cost (parameters, multiply-accumulates), in the grid's order."""
    names = list(summaries)
    modes = ["max" if higher_is_better else "min", "min"]
    fronts = {}
    for cost in ("params", "macs"):
        flags = non_dominated([(summaries[n]["mean"], extra[n][cost]) for n in names], modes)
        fronts[cost] = [n for n, on in zip(names, flags) if on]
    return fronts


def cost_png(stats: dict[str, Any], metric: str, path: Path) -> Path:
    """Each alternative's mean score with its confidence interval against its parameters and
    its MACs (one panel each), the non-dominated ones (`stats["cost_front"]`) in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    summaries, extra = stats["summaries"], stats["extra"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (cost, label) in zip(axes, (("params", "parameters"), ("macs", "MACs per image"))):
        front = set(stats["cost_front"][cost])
        for name, s in summaries.items():
            x, on = float(extra[name][cost]), name in front
            ax.errorbar([x], [s["mean"]], yerr=[[s["mean"] - s["ci_low"]], [s["ci_high"] - s["mean"]]], fmt="o",
                        color="tab:red" if on else "tab:gray", capsize=4, ms=8 if on else 6)
            ax.annotate(name + (" *" if on else ""), (x, s["mean"]), fontsize=8, xytext=(5, 5),
                        textcoords="offset points")
        xs = [float(extra[n][cost]) for n in summaries]
        if min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        confidence = next(iter(summaries.values()))["confidence"]
        ax.set(xlabel=label, ylabel=f"mean {metric} ({confidence:.0%} interval)",
               title=f"{metric} against {label} (* non-dominated)")
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def per_fold_png(scores: dict[str, list[float]], metric: str, path: Path) -> Path:
    """Each alternative's per-fold scores (points joined by fold) and their mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    names = list(scores)
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names)), 4))
    folds = np.array([scores[n] for n in names])  # alternatives x folds
    for fold in range(folds.shape[1]):
        ax.plot(range(len(names)), folds[:, fold], marker="o", alpha=0.6, label=f"fold {fold}")
    ax.plot(range(len(names)), folds.mean(axis=1), "k_", markersize=30, mew=2, label="mean")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set(ylabel=metric, title=f"{metric} per fold")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)

