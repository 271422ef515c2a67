"""`run_sweep(cfg, train=...)`: a Ray Tune sweep of the train task, tracked as one MLflow run tree.

Validates the whole sweep first (`plan.plan_sweep`), starts or joins Ray, runs the trials
(`trial.run_trial`), then keeps the best one: `results/tune/best.yaml` (its overrides and
full config, which the train stage applies), `trials.csv` and `curves.json`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config import flatten
from pipeline.errors import ConfigError, PipelineError, Terminated
from pipeline.quiet import verbose
from pipeline.tracking.mlflow_run import tracking_target
from pipeline.tracking.provenance import git_commit
from pipeline.tracking.server import check_tracking
from pipeline.tuning.plan import Plan, plan_sweep
from pipeline.tuning.ray_init import Shared, init_ray
from pipeline.tuning.results import abort_tree, collect, finish_parent, write_outputs
from pipeline.tuning.stopping import sigterm_stops_sweep
from pipeline.tuning.trial import TrainFn


class SweepInterrupted(PipelineError):
    """The sweep stopped before every trial ended (Ctrl+C, SIGUSR1): resume it."""

    exit_code = 130


def check_storage(plan: Plan) -> None:
    """A cluster needs storage every node sees: a local folder would split the experiment."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if plan.storage_is_local and len(alive) > 1 and not plan.tune.get("storage_path"):
        raise ConfigError(f"Ray has {len(alive)} nodes but tune.storage_path is the local folder {plan.storage}: "
                          "set tune.storage_path to a folder every node mounts (NFS) or to s3://bucket/path.")
    if plan.storage_is_local and len(alive) > 1:
        print(f"note: {len(alive)} Ray nodes share tune.storage_path={plan.storage}; it must be mounted on every node.")
    gpu = plan.tune["resources"]["gpu"]
    if gpu and not ray.cluster_resources().get("GPU"):
        raise ConfigError(f"tune.resources.gpu={gpu} but the Ray cluster has no GPU: set tune.resources.gpu=0.")


def _scheduler(plan: Plan) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    from pipeline.tuning.schedulers import FinalEpochPBT

    tune, name = plan.tune, plan.tune["scheduler"]
    max_t = plan.steps  # epochs, or folds with tune.cv (a trial then reports once per fold)
    if name == "asha":
        a = tune["asha"]
        # stop_last_trials=False: a trial reaching max_t ends by itself (its train() completes).
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=a["grace_period"],
                             reduction_factor=a["reduction_factor"], brackets=a["brackets"], stop_last_trials=False)
    if name == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=max_t, stop_last_trials=False,
                                  reduction_factor=tune["hyperband"]["reduction_factor"])
    if name == "pbt":
        p = tune["pbt"]
        mutations = {k: plan.space[k].domain() for k in p["mutate"] if k in plan.space}
        return FinalEpochPBT(max_t=max_t, time_attr="training_iteration", perturbation_interval=p["perturbation_interval"],
                             hyperparam_mutations=mutations, quantile_fraction=p["quantile_fraction"],
                             resample_probability=p["resample_probability"])
    return FIFOScheduler()


def _search(plan: Plan) -> tuple[Any, int | None]:
    """The search algorithm and the `max_concurrent_trials` to give TuneConfig."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    limit = plan.tune.get("max_concurrent_trials")
    seed = int(plan.cfg.seed)
    if plan.tune["search_alg"] in ("optuna", "nsga2"):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        if plan.tune["search_alg"] == "nsga2":
            from pipeline.tuning.samplers import NSGAIISampler

            # At least two generations within the sweep: the first is sampled at random.
            population = max(2, min(50, int(plan.tune["num_samples"]) // 2))
            sampler = NSGAIISampler(population_size=population, seed=seed)
        elif not plan.objectives:
            sampler = optuna.samplers.TPESampler(seed=seed)
        else:
            # Multi-objective TPE. Its first n_startup_trials are random (Optuna's default: 10,
            # all of a 10-trial sweep); a third of the sweep leaves most trials to TPE.
            startup = max(2, min(10, int(plan.tune["num_samples"]) // 3))
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        objectives = plan.objectives
        if not objectives:
            return OptunaSearch(sampler=sampler), limit
        # Optuna is told each trial's last report, the first objective at its last epoch
        # (it takes no per-epoch values with several objectives); pareto.csv ranks trials
        # by their best epoch, as for one objective.
        return OptunaSearch(metric=[m for m, _ in objectives], mode=[d for _, d in objectives],
                            sampler=sampler), limit
    return BasicVariantGenerator(max_concurrent=limit or 0, random_state=seed), None


def param_space(plan: Plan) -> dict[str, Any]:
    if plan.tune["search_alg"] == "grid":
        from ray import tune

        return {k: tune.grid_search(list(d.args)) for k, d in plan.space.items()}
    return {k: d.domain() for k, d in plan.space.items()}


def _experiment(plan: Plan) -> tuple[str, bool]:
    """(experiment folder name, restore?): the latest restorable `<name>-*` when resuming."""
    from ray.tune import Tuner

    name = plan.tune["name"]
    if plan.tune["resume"]:
        if plan.storage_is_local and Path(plan.storage).is_dir():
            previous = sorted(p.name for p in Path(plan.storage).glob(f"{name}-*") if p.is_dir())
            for folder in reversed(previous):
                if Tuner.can_restore(str(Path(plan.storage) / folder)):
                    return folder, True
        print(f"tune.resume=true but no earlier sweep '{name}' in {plan.storage}: starting a new one.")
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", False


def _mlflow_callback(plan: Plan, path: str, parent_run_id: str | None = None,
                     datasets: dict[str, Any] | None = None) -> Any:
    from pipeline.tuning.mlflow_tree import MlflowTreeCallback, map_path

    cfg = plan.cfg
    params = flatten({k: v for k, v in plan.base.items() if k != "tune"})
    params.update(flatten({"tune": plan.tune}))
    tags = {"sweep": plan.tune["name"], "dataset": cfg.data.name, "model": cfg.model.name,
            "search_alg": plan.tune["search_alg"], "tune_scheduler": plan.tune["scheduler"],
            "ray_experiment": path, **git_commit(plan.root)}
    return MlflowTreeCallback(target=tracking_target(cfg.tracking, cfg.paths.root), map_path=map_path(path),
                              parent_name=f"tune-{plan.tune['name']}-{cfg.model.name}-{cfg.data.name}",
                              parent_params=params, parent_tags=tags, fixed=plan.fixed,
                              max_steps=plan.steps, step_key=plan.step_key,
                              log_hyperparameters=plan.tune["scheduler"] == "pbt", parent_run_id=parent_run_id,
                              datasets=datasets)


def _json_logger() -> Any:
    """Ray's JSON result logger (result.json: every trial's curve, read back by `collect`),
    except that a retried trial keeps the driver's own result.json. On each trial (re)start
    Ray 2.60 copies the storage path's result.json over the driver's, to continue a file
    another driver wrote; but that copy is only as recent as the last experiment-state save
    (every 10 s or so), so a trial retried in between lost its latest epochs (trials.csv: 2
    of 3). The storage copy is needed only when this driver has none (`tune.resume=true`)."""
    from ray.tune.logger import JsonLoggerCallback

    class DriverFirstJsonLogger(JsonLoggerCallback):
        def _restore_from_remote(self, file_name: str, trial: Any) -> None:
            if not Path(trial.local_path, file_name).is_file():
                super()._restore_from_remote(file_name, trial)

    return DriverFirstJsonLogger()


def build_tuner(plan: Plan, train: TrainFn, trial_callbacks: Sequence[Any] = (),
                data: Shared | None = None, parent_run_id: str | None = None,
                datasets: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The Tuner (new or restored) and its experiment path; each trial trains with `train`,
    on `data` (train's `data=`) if given; the sweep's MLflow parent nests under `parent_run_id`."""
    from ray import tune

    from pipeline.tuning.recovery import driver_id, record_reported_callback
    from pipeline.tuning.trial import run_trial

    folder, restore = _experiment(plan)
    path = f"{plan.storage.rstrip('/')}/{folder}"
    resources, ddp = {"cpu": plan.tune["resources"]["cpu"], "gpu": plan.tune["resources"]["gpu"]}, None
    if plan.tune["workers"] > 1:
        # The trial only relays: its Ray Train workers reserve workers x resources themselves.
        ddp = {"workers": plan.tune["workers"], **resources,
               "storage": path.removeprefix("file://") if plan.storage_is_local else path}
        resources = {"cpu": 0, "gpu": 0, "memory": 1}  # Ray refuses an all-zero bundle
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, train=train, base=plan.base, blocks=plan.blocks, callbacks=list(trial_callbacks),
                             experiment=path.removeprefix("file://") if plan.storage_is_local else None, ddp=ddp,
                             data=data, driver=driver_id()),
        resources)
    if restore:
        print(f"Resuming the sweep in {path}")
        # Finished trials stay as they are; errored ones resume from their last checkpoint.
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space(plan)), path
    callbacks: list[Any] = [_json_logger()]  # result.json: per-trial curves for the outputs
    if plan.cfg.tracking.enabled:
        callbacks.append(_mlflow_callback(plan, path, parent_run_id, datasets))
    callbacks.append(record_reported_callback())  # each result's checkpoint, where retries resume
    search_alg, limit = _search(plan)
    # Several objectives: the search algorithm holds them (Tune's own metric is one name), the
    # scheduler is FIFO (plan: nothing can stop trials on several metrics).
    single = not plan.objectives
    tune_config = tune.TuneConfig(metric=plan.tune["metric"] if single else None,
                                  mode=plan.tune["mode"] if single else None, search_alg=search_alg,
                                  scheduler=_scheduler(plan), num_samples=1 if plan.tune["search_alg"] == "grid"
                                  else plan.tune["num_samples"], max_concurrent_trials=limit,
                                  time_budget_s=plan.tune.get("time_budget_s"), reuse_actors=True)
    metric = plan.tune["metric"]  # with tune.cv: the running mean over the folds done
    columns = {"training_iteration": f"{plan.step_key}s", metric: metric, "val/loss": "val/loss",
               "train/loss": "train/loss", **{m: m for m, _ in plan.objectives}}
    # The status table at most once a minute (every 10 s with `pipeline -v`): a long sweep still
    # shows its progress, a short one is not a scroll of repeated tables; the final one always.
    reporter = tune.CLIReporter(metric_columns=columns,
                                parameter_columns=list(plan.space), max_report_frequency=10 if verbose() else 60,
                                max_progress_rows=30)  # sort_by_metric fails on metric-less trials
    run_config = tune.RunConfig(
        name=folder, storage_path=plan.storage, verbose=1, callbacks=callbacks, progress_reporter=reporter,
        failure_config=tune.FailureConfig(max_failures=plan.tune["max_failures"]),
        sync_config=tune.SyncConfig(sync_artifacts=not plan.storage_is_local),  # trial outputs to the cloud
        # PBT restores trials from other trials' checkpoints, possibly after those trials moved
        # on: rotating them away would fail the restore, so PBT keeps all.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None if plan.tune["scheduler"] == "pbt" else 2))
    return tune.Tuner(trainable, param_space=param_space(plan), tune_config=tune_config,
                      run_config=run_config), path


def run_sweep(cfg: DictConfig, *, train: TrainFn, load: Callable[[DictConfig], Any] | None = None,
              trial_callbacks: Sequence[Any] = (), parent_run_id: str | None = None,
              inputs: Callable[[DictConfig, Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the configured sweep, each trial fitting with `train` (the train task, passed in
    by `pipeline.tasks.tune`: this library sits below the tasks); returns the best trial's
    summary (`best.yaml` without the config). `load(config)` reads the data every trial
    trains on (train's `data=`): once, here, and the trials get it through Ray's object
    store, so they read nothing from the data folders. `trial_callbacks` are extra Lightning
    callbacks for every trial's Trainer (picklable). The sweep's MLflow parent run is a child
    of `parent_run_id` when given (an outer fold of a nested cross-validation).
    `inputs(config, data)` names the MLflow datasets of the trials' and their folds' runs
    (`{"trial": [...], "folds": {"<i>": [...]}}`: plain values, from what `load` read).
    """
    plan = plan_sweep(cfg)
    check_tracking(plan.cfg.tracking, plan.cfg.paths.root)  # before Ray starts
    # Before Ray starts, so a missing or stale split fails in seconds; from the trials'
    # shared config (`tune.fixed` applied), which each trial checks it against again.
    base = OmegaConf.create(plan.base)
    data = load(base) if load is not None else None
    datasets = inputs(base, data) if inputs is not None and data is not None else None
    started = init_ray(plan.tune)
    import ray

    try:
        check_storage(plan)
        tuner, path = build_tuner(plan, train, trial_callbacks, Shared(data) if data is not None else None,
                                  parent_run_id, datasets)
        start = time.perf_counter()
        try:
            with sigterm_stops_sweep() as terminated:
                grid = tuner.fit()  # results are read back from the experiment folder, as on resume
            elapsed = time.perf_counter() - start
            outcome = collect(plan, path, all_ended=grid.num_terminated + grid.num_errors == len(grid))
            # Trials left PENDING, RUNNING or PAUSED mean a stop signal, unless the time budget ran out.
            budget = plan.tune.get("time_budget_s")
            out_of_time = budget is not None and elapsed >= budget
            interrupted = [t for t in outcome.trials
                           if not out_of_time and t["status"] in ("PENDING", "RUNNING", "PAUSED")]
            # SIGTERM ends the sweep unfinished even if it came after the last trial: its exit
            # status (143) should not depend on when the signal arrived.
            stopped = bool(interrupted) or terminated.is_set()
            write_outputs(plan, outcome, final=not stopped)
            if plan.cfg.tracking.enabled:
                finish_parent(plan, outcome, path, interrupted=stopped, elapsed=elapsed)
        except BaseException as err:
            # Also after the loop: a crash or signal while writing must not leave the tree RUNNING.
            if plan.cfg.tracking.enabled:
                abort_tree(plan, path, err)
            raise
    finally:
        if started:
            ray.shutdown()
    if terminated.is_set():
        raise Terminated(f"terminated: the sweep stopped ({len(interrupted)} of {len(outcome.trials)} trials "
                         f"unfinished); continue it with {plan.resume_overrides} (experiment {path}).")
    if interrupted:
        raise SweepInterrupted(f"the sweep stopped with {len(interrupted)} trial(s) unfinished; continue it with "
                               f"{plan.resume_overrides} (experiment {path}).")
    if outcome.best is None:
        raise PipelineError(f"no trial of {path} produced a finite {plan.tune['metric']}: see trials.csv.")
    print(f"best trial {outcome.best['trial_id']}: {plan.tune['metric']}={outcome.best['value']:.4f} "
          f"in {elapsed:.0f} s; wrote {plan.results}/best.yaml")
    return {k: v for k, v in outcome.best.items() if k != "config"}
