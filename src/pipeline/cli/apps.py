"""The Hydra apps: `pipeline train|tune|cv|compare|report [hydra overrides]`.

Each composes `conf/` with the command line's overrides (Hydra's `-m`, `--help`, `--cfg job`
work as usual), writes into Hydra's run folder (`outputs/<date>/<time>/`, never over the DVC
pipeline's outputs), fetches and splits the dataset first if missing, calls the job's task
and prints a short summary. `launch` is the one way in; `JOBS` lists the jobs.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from pipeline.cli import exits


class _Carried(BaseException):
    """Carries a task's exception past Hydra, which would print any exception with a
    traceback and exit 1, as for its own override errors, to `exits.run` (a user error: its
    message and 2; a bug: its traceback and 1)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


def _run_adhoc(cfg: DictConfig, task: Callable[[DictConfig], Any],
               check: Callable[[DictConfig], DictConfig] | None = None) -> Any:
    """`task(cfg)` with outputs in Hydra's run folder and the data prepared first. `check(cfg)`
    validates everything the task will read and returns the prepared config (default:
    `prepare`), before the tracking server is asked, the data fetched or a run started. A run
    refused for a user error leaves no folder behind."""
    from hydra.core.hydra_config import HydraConfig

    from pipeline.errors import PipelineError
    from pipeline.tasks.data import ensure_data
    from pipeline.tracking.runlog import run_log
    from pipeline.tracking.server import check_tracking
    from pipeline.validation import prepare

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    with open_dict(cfg):
        cfg.paths.out_dir = str(out_dir)
        if cfg.tracking.get("register", False) is None:  # on for the DVC pipeline only (conf/tracking)
            cfg.tracking.register = False
    try:
        checked = (check or prepare)(cfg)
        # Before the data, which may be a download.
        check_tracking(checked.tracking, checked.paths.root)
        with run_log(out_dir):  # <out>/run.log, attached to the task's MLflow run
            ensure_data(cfg)
            return task(cfg)
    except PipelineError as err:
        _drop_if_unused(out_dir)
        raise _Carried(err) from err
    except Exception as err:
        raise _Carried(err) from err


def _drop_if_unused(out_dir: Path) -> None:
    """Hydra made the folder, with only its `.hydra/` record (and `run.log`, the refusal's),
    before the task could check the config: remove it, and its parents that are now empty up
    to the working directory (outputs/<date>/, outputs/), from which Hydra's relative run
    folders start. A folder at or above the working directory (or elsewhere, with an absolute
    hydra.run.dir) was not Hydra's to make: it stays."""
    if not (out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= {".hydra", "run.log"}):
        return
    out_dir = out_dir.resolve()
    shutil.rmtree(out_dir)
    cwd = Path.cwd().resolve()
    for parent in out_dir.parents:
        if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()


def _show(lines: list[str], figures: dict[str, Any]) -> None:
    """Print a task's summary; in a multirun, hand its figures to the sweep's table too."""
    from pipeline.cli.sweep import record

    print("\n".join(lines), flush=True)
    record(figures)


def _train(cfg: DictConfig) -> float:
    from pipeline.cli import summaries
    from pipeline.cli.sweep import in_multirun

    def train_and_evaluate(c: DictConfig) -> dict[str, float]:
        # Imported once the config is checked: a bad value fails without Lightning's seconds of imports.
        from pipeline.tasks.evaluate import evaluate
        from pipeline.tasks.train import train

        return {**train(c), **evaluate(c)}

    metrics = _run_adhoc(cfg, train_and_evaluate)
    run = summaries.run_of_outputs(cfg)
    _show(summaries.train(cfg, metrics, hint=not in_multirun()),
          {"val/acc": metrics.get("val/acc"), "test/acc": metrics.get("test/acc"),
           **({"run": run[1], "tracking_uri": run[0]} if run else {})})
    return metrics[cfg.optimized_metric]


def _tune(cfg: DictConfig) -> float:
    from pipeline.cli import summaries
    from pipeline.cli.sweep import in_multirun
    from pipeline.tasks.tune import check_sweep, tune

    best = _run_adhoc(cfg, tune, check_sweep)
    _show(summaries.tune(cfg, best, hint=not in_multirun()),
          {best["metric"]: best["value"], "run": best.get("mlflow_parent_run_id"),
           "tracking_uri": summaries.tracking_uri(cfg)})
    return best["value"]


def _cv(cfg: DictConfig) -> float:
    from pipeline.cli import summaries
    from pipeline.cli.sweep import in_multirun
    from pipeline.tasks.cv import check_cv, cv

    result = _run_adhoc(cfg, cv, check_cv)
    nested = result.get("nested", False)  # then scored on the held-out outer folds
    _show(summaries.cv(cfg, result, hint=not in_multirun()),
          {key: result[key]["mean"] for key in ("val/acc", "test/acc") if key in result}
          | {"run": result.get("mlflow_run_id"), "tracking_uri": summaries.tracking_uri(cfg)})
    return result["outer/acc" if nested else "val/acc"]["mean"]


def _compare(cfg: DictConfig) -> None:
    from pipeline.cli import summaries
    from pipeline.cli.sweep import in_multirun
    from pipeline.tasks.compare import check_compare, compare

    result = _run_adhoc(cfg, compare, check_compare)
    _show(summaries.compare(cfg, result, hint=not in_multirun()),
          {"run": result.get("mlflow_run_id"), "tracking_uri": summaries.tracking_uri(cfg)})


def _report(cfg: DictConfig) -> None:
    """Without `run_id`, the DVC pipeline's train outputs under `paths.out_dir` (or an ad-hoc
    run's: `paths.out_dir=outputs/<date>/<time>`) into `<out>/reports/`; with `run_id`, that
    MLflow run into this command's own run folder."""
    from hydra.core.hydra_config import HydraConfig

    from pipeline.cli import summaries
    from pipeline.cli.sweep import in_multirun
    from pipeline.tasks.report import report, report_for_run

    with open_dict(cfg):
        run_id = cfg.pop("run_id", None)
        if run_id:
            cfg.paths.out_dir = HydraConfig.get().runtime.output_dir
    path = report_for_run(str(run_id), cfg) if run_id else report(cfg)
    run = (summaries.tracking_uri(cfg), str(run_id)) if run_id else summaries.run_of_outputs(cfg)
    _show(summaries.report(cfg, path, str(run_id) if run_id else None, hint=not in_multirun()),
          {"run": run[1], "tracking_uri": run[0]} if run else {})


def _with_run_id_key(argv: list[str]) -> list[str]:
    """`run_id=X` -> `+run_id='X'`: the key is not in conf/ (it is no pipeline parameter), and
    quoted so that an id of digits and one `e` stays a string rather than a Hydra number."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "run_id":
            arg = f"+run_id={value}" if value[:1] in ("'", '"') or not value else f"+run_id='{value}'"
        out.append(arg)
    return out


def _with_job_name(job: str, argv: list[str]) -> list[str]:
    """`argv` plus `hydra.job.name=<job>` (else Hydra names every job after this file, "apps"),
    placed beside the user's overrides: Hydra's parser takes its overrides as one run of
    positional arguments, so one on either side of `--cfg job` would be refused."""
    first = next((i for i, arg in enumerate(argv) if "=" in arg and not arg.startswith("-")), len(argv))
    return [*argv[:first], f"hydra.job.name={job}", *argv[first:]]


# job -> (its app, what it does: the `pipeline` tool's help)
JOBS: dict[str, tuple[Callable[[DictConfig], Any], str]] = {
    "train": (_train, "train and evaluate one model"),
    "tune": (_tune, "a Ray Tune sweep of the train task (conf/tune/)"),
    "cv": (_cv, "k-fold cross-validation of one configuration (cv.nested=true: of the whole sweep)"),
    "compare": (_compare, "cross-validate a grid of designs and test the differences"),
    "report": (_report, "the HTML report of what a trained network learned (run_id=<id>: any run)"),
}


def _check_overrides(argv: list[str]) -> None:
    """Parse each override as Hydra will, so that one it cannot read is named: Hydra's own
    message names only the token it stumbled on ("mismatched input '['"), not the override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from pipeline.errors import ConfigError

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue  # Hydra's flags and their values
        try:
            parser.parse_override(arg)
        except HydraException as err:
            raise ConfigError(f"cannot read the override {arg!r}: {str(err).strip()}. Quote a value holding "
                              "brackets, parentheses or commas that is one string, e.g. "
                              "\"tune.space.optimizer.lr='loguniform(1e-4, 1e-1)'\".") from None


def launch(job: str, argv: list[str]) -> int:
    """Run the Hydra app of `job` with `argv` (overrides and Hydra flags); its exit status."""
    import hydra

    from pipeline.config import CONFIG_NAME, config_dir

    def body() -> None:
        _check_overrides(argv)
        try:
            app = hydra.main(config_path=str(config_dir()), config_name=CONFIG_NAME, version_base="1.3")(JOBS[job][0])
            sys.argv = [f"pipeline {job}", *_with_job_name(job, _with_run_id_key(argv) if job == "report" else argv)]
            app()
        except SystemExit as stop:  # Hydra's own exit: 1 is a bad override or option, a user error
            raise SystemExit(2 if stop.code == 1 else stop.code) from None
        except _Carried as carried:
            raise carried.error from None

    return exits.run(body)
