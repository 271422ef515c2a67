"""The cross-validation task: one model per stratified fold, aggregated with confidence
intervals, tracked as an MLflow parent run with one child run per fold.

Fold i trains on the other k-1 folds and validates on fold i (`data.fold`); the test split
is never seen during training. With `cv.repeats` = r > 1 the split holds r independent
k-fold partitions and r x k models are trained, labelled by repetition and fold. Folds run
one after another, or in parallel as Ray tasks (`cv.parallel`, on the Ray `tune.address`
names, as sweeps do; `auto`, the default, where two folds fit at once), or on this machine
alone in a pool of worker processes (`pipeline.tasks.fold_pool`: no Ray to start). Each fold
is seeded and deterministic on its own, so the same settings give the same numbers; a
parallel fold trains with `cv.cpus_per_fold` threads, and a sequential one with every core,
which sums in another order (equal results when the thread counts agree). Folds on Ray get
the data from the driver through Ray's object store, so they need no access to the data
folders; local workers read them, as sequential folds do.

One writer per MLflow store, as in sweeps: sequential folds write their runs themselves, one
after another; a parallel fold records its run (`RecordedRun`) and the driver writes it when
the fold returns, so both produce the same run tree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.analysis.stats import summarize
from pipeline.config import flatten, fold_config, fold_count, fold_position, to_container
from pipeline.data.splits import load_splits
from pipeline.data.store import read_raw
from pipeline.layout import Layout
from pipeline.quiet import quiet, quiet_worker
from pipeline.tasks.common import TrainingData, load_data, write_json, write_run_file
from pipeline.tasks.fold_pool import ProcessPool, worker_env
from pipeline.tracking.mlflow_run import TrackedRun, tracking_target
from pipeline.tracking.recorded import RecordedRun
from pipeline.tracking.server import check_tracking
from pipeline.training.metrics import file_row
from pipeline.validation import prepare, refuse_resume

log = logging.getLogger(__name__)

# Metrics aggregated over folds (what each fold's train + evaluate return).
CV_METRICS = ("val/acc", "val/loss", "test/acc", "test/loss", "test/f1_macro")
CANCEL_TIMEOUT_S = 30  # for cancelled folds to wind down before Ray shuts down
TEST_PROBS = "test_probs"  # a fold result's test-split probabilities (not a metric)
FOLD_SECONDS = "time_s"  # a fold's training and evaluation time; summed over folds in a CV result
ENSEMBLE_METRICS = ("acc", "loss", "f1_macro")  # of the fold ensemble, as ensemble/test/*


def parallel_folds(cv: Mapping[str, Any], tune: Mapping[str, Any], folds: int) -> bool:
    """Whether `folds` folds run in parallel: `cv.parallel`, where `auto` means when two folds
    or more can train at once: on the cluster `tune.address` names, or here with 2 x
    `cv.cpus_per_fold` CPUs (of `tune.num_cpus`, if set). Starting workers (and their imports)
    costs seconds, which one fold at a time would never win back. Nested CV is sequential
    (each outer fold's sweep is the parallel part)."""
    if cv["parallel"] != "auto":
        return bool(cv["parallel"])
    if cv.get("nested") is True or folds < 2:
        return False
    return bool(tune.get("address")) or (tune.get("num_cpus") or os.cpu_count() or 1) >= 2 * int(cv["cpus_per_fold"])


def _local_cpus(cfg: Mapping[str, Any], folds: int) -> int:
    """The CPUs `folds` parallel folds get on this machine: `tune.num_cpus`, else one set of
    `cv.cpus_per_fold` per fold, at most the machine's (at least one fold's)."""
    per_fold = int(cfg["cv"]["cpus_per_fold"])
    return cfg["tune"].get("num_cpus") or max(per_fold, min(folds * per_fold, os.cpu_count() or 1))


def on_ray(tune: Mapping[str, Any]) -> bool:
    """Whether parallel folds are Ray tasks: on the cluster `tune.address` names, or on a Ray
    this process is already connected to (a caller's); else they run in a local pool."""
    ray = sys.modules.get("ray")  # never imported: never started either
    return bool(tune.get("address")) or (ray is not None and ray.is_initialized())


def _fold_worker_setup() -> None:
    """A local fold worker's start: the training code's imports, while the driver goes on."""
    import pipeline.tasks.evaluate  # noqa: F401
    import pipeline.tasks.train  # noqa: F401

    quiet()
    quiet_worker()


@contextlib.contextmanager
def local_fold_pool(cfg: Mapping[str, Any], folds: int) -> Iterator[ProcessPool | None]:
    """For `folds` parallel folds: a pool of local worker processes, started now so that their
    imports overlap what the caller does next (its MLflow runs, its data), and stopped on
    leaving; or None, where the folds run on Ray (`on_ray`, started by `run_parallel`). A
    comparison holds one for all its alternatives, whose folds reuse its workers."""
    if on_ray(cfg["tune"]):
        yield None
        return
    per_fold = int(cfg["cv"]["cpus_per_fold"])
    with ProcessPool(max(1, min(folds, _local_cpus(cfg, folds) // per_fold)), setup=_fold_worker_setup,
                     env=worker_env(per_fold), name="fold-worker") as pool:
        yield pool


@contextlib.contextmanager
def fold_ray(cfg: Mapping[str, Any], folds: int) -> Iterator[None]:
    """Ray for `folds` parallel folds, shut down on leaving if started here: the one
    `tune.address` names, else a local one (`_local_cpus`). A comparison holds one for all its
    alternatives, so their folds reuse the same workers (and their imports)."""
    from pipeline.tuning.ray_init import init_ray

    started = init_ray(cfg["tune"], num_cpus=_local_cpus(cfg, folds))
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def _fold_line(result: dict[str, Any], cfg: Mapping[str, Any], done: int, total: int, seconds: float) -> str:
    rep, i = fold_position(OmegaConf.create(cfg), result["fold"])
    name = f"repetition {rep} fold {i}" if cfg["cv"]["repeats"] > 1 else f"fold {i}"
    if cfg["tracking"].get("run_name"):  # a comparison's alternative
        name = f"{cfg['tracking']['run_name']}: {name}"
    scores = "  ".join(f"{k}={result[k]:.4f}" for k in ("val/acc", "test/acc") if k in result)
    return f"{name} done ({done}/{total}, {seconds:.0f} s): {scores}"


def run_fold(cfg: dict[str, Any], fold: int, parent_run_id: str | None,
             record: RecordedRun | None = None, data: TrainingData | None = None) -> dict[str, Any]:
    """Train and evaluate one fold (a plain dict config, so a Ray task can take it); with
    `record`, its MLflow run is recorded there instead of written; with `data`, nothing is
    read from the data folders. Also returns its test probabilities and its time."""
    from pipeline.tasks.evaluate import evaluate
    from pipeline.tasks.train import train

    start = time.monotonic()
    plain = OmegaConf.create(cfg)
    fold_cfg = fold_config(plain, fold)
    rep, i = fold_position(plain, fold)
    tags = {"fold": str(i), **({"repetition": str(rep)} if cfg["cv"]["repeats"] > 1 else {})}
    metrics = train(fold_cfg, parent_run_id=parent_run_id, run_tags=tags, record=record, data=data)
    metrics.update(evaluate(fold_cfg, run=record, data=data))
    # The test probabilities travel back with the scores: a parallel fold's folder may be on
    # another node, and the driver averages them into the fold ensemble.
    return {"fold": fold, **metrics, TEST_PROBS: np.load(Layout.from_cfg(fold_cfg).predictions),
            FOLD_SECONDS: time.monotonic() - start}


def fold_ensemble(probs: list[np.ndarray], labels: np.ndarray, classes: list[str]) -> dict[str, float]:
    """The fold models as one ensemble on the test split: the mean of their softmax outputs
    (each as evaluate computed it, test-time augmentation included), scored like one model."""
    from pipeline.tasks.evaluate import scores

    overall, _, _ = scores(np.mean(probs, axis=0), labels, classes)
    return {"ensemble/models": len(probs), **{f"ensemble/test/{k}": overall[k] for k in ENSEMBLE_METRICS}}


@dataclass
class FoldOutcome:
    """What a parallel fold sends back: its results or error, and its recorded run."""

    fold: int
    host: str
    record: RecordedRun | None
    result: dict[str, Any] | None = None
    error: Exception | None = None
    trace: str = ""  # the error's traceback, which pickling drops


# A local worker's data, read for its first fold and kept for the others (each fold's train
# and evaluate would otherwise read the arrays and dvc.lock again), by folder and residency.
_WORKER_DATA: dict[tuple[str, str, Any], TrainingData] = {}


def _worker_data(cfg: dict[str, Any]) -> TrainingData:
    plain = OmegaConf.create(cfg)
    layout = Layout.from_cfg(plain)
    key = (str(layout.raw), str(layout.splits), plain.data.get("in_memory"))
    if key not in _WORKER_DATA:
        _WORKER_DATA[key] = load_data(plain, layout)
    return _WORKER_DATA[key]


def _fold_task(cfg: dict[str, Any], fold: int, parent_run_id: str | None, threads: int,
               data: TrainingData | None) -> FoldOutcome:
    """One fold in a worker (Ray's or a local pool's), which never opens the MLflow store (see
    the module docstring). On Ray it does not open the data folders either (`data` comes from
    the object store); a local worker reads them once for all its folds."""
    import torch

    torch.set_num_threads(threads)
    # Folds side by side: their progress bars and Lightning's header would interleave; the
    # driver says when each fold is done.
    quiet_worker()
    cfg = {**cfg, "trainer": {**cfg["trainer"], "enable_progress_bar": False}}
    outcome = FoldOutcome(fold, socket.gethostname(), RecordedRun() if cfg["tracking"]["enabled"] else None)
    try:
        outcome.result = run_fold(cfg, fold, parent_run_id, outcome.record,
                                  data if data is not None else _worker_data(cfg))
    except Exception as err:  # returned, so the driver still writes the failed fold's run
        outcome.error, outcome.trace = err, traceback.format_exc()
    return outcome


def _write_fold_run(cfg: dict[str, Any], outcome: FoldOutcome) -> None:
    if outcome.record is None or not outcome.record.begun:
        return
    run = outcome.record.replay(tracking_target(cfg["tracking"], cfg["paths"]["root"]))
    layout = Layout.from_cfg(fold_config(OmegaConf.create(cfg), outcome.fold))
    # The fold's folder is this machine's only if the fold ran here (or on a node sharing it).
    if outcome.host == socket.gethostname() and layout.models.is_dir():
        write_run_file(layout, run)


@dataclass
class FoldJob:
    """One cross-validation's folds as parallel tasks (`run_parallel`), trained on `data` (None:
    each fold reads the data folders); once run, what each fold sent back."""

    plain: dict[str, Any]
    folds: list[int]
    parent_run_id: str | None
    data: TrainingData | None
    outcomes: list[FoldOutcome] = field(default_factory=list)

    def results(self) -> list[dict[str, Any]]:
        """The folds' results in fold order; a failed fold's error is raised here."""
        outcomes = sorted(self.outcomes, key=lambda o: o.fold)
        for outcome in outcomes:
            if outcome.error is not None:
                raise outcome.error from RuntimeError(f"fold {outcome.fold} on {outcome.host}:\n{outcome.trace}")
        return [o.result for o in outcomes]


def _received(job: FoldJob, outcome: FoldOutcome, start: float) -> None:
    """A fold's outcome is back: keep it, write its run, say so."""
    job.outcomes.append(outcome)
    _write_fold_run(job.plain, outcome)
    if outcome.result is not None:
        log.info(_fold_line(outcome.result, job.plain, len(job.outcomes), len(job.folds), time.monotonic() - start))


def run_parallel(jobs: list[FoldJob], pool: ProcessPool | None = None) -> None:
    """Every job's folds in one queue (a comparison's alternatives side by side: no core idles
    at the end of each), on `pool` (`local_fold_pool`), else as Ray tasks; each fold's run is
    written here as the fold returns. Fold errors are kept in the jobs' outcomes; a stop
    signal stops the folds under way."""
    if pool is not None:
        _run_local(jobs, pool)
        return
    import ray

    from pipeline.tuning.stopping import sigterm_interrupts_ray

    pending: dict[Any, FoldJob] = {}
    start = time.monotonic()
    with fold_ray(jobs[0].plain, sum(len(job.folds) for job in jobs)):
        try:
            shared: dict[int, Any] = {}  # one copy per node of each dataset, which every fold there reads zero-copy
            for job in jobs:
                if id(job.data) not in shared:
                    shared[id(job.data)] = ray.put(job.data)
                per_fold = int(job.plain["cv"]["cpus_per_fold"])
                task = ray.remote(num_cpus=per_fold)(_fold_task)
                for fold in job.folds:
                    pending[task.remote(job.plain, fold, job.parent_run_id, per_fold, shared[id(job.data)])] = job
            with sigterm_interrupts_ray():
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    job = pending.pop(done[0])
                    _received(job, ray.get(done[0]), start)
        except BaseException:
            # A stop signal: ray.shutdown would kill the running folds mid-step. Cancelling raises
            # KeyboardInterrupt in each, which ends it cleanly; folds not finished write no run
            # (they only recorded theirs), and the CV parent runs end KILLED.
            for ref in pending:
                ray.cancel(ref)
            ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_TIMEOUT_S)
            raise


def _run_local(jobs: list[FoldJob], pool: ProcessPool) -> None:
    """`run_parallel` on a local pool. A stop signal (KeyboardInterrupt, `Terminated`) ends the
    workers at once: their folds only recorded their runs, so nothing half-written remains."""
    start = time.monotonic()
    tasks = [((job, fold), _fold_task, (job.plain, fold, job.parent_run_id, int(job.plain["cv"]["cpus_per_fold"]),
                                        job.data))
             for job in jobs for fold in job.folds]
    try:
        for (job, fold), outcome in pool.run(tasks):
            if isinstance(outcome, Exception):  # the worker died, or the task could not run
                outcome = FoldOutcome(fold, socket.gethostname(), None, error=outcome, trace=str(outcome))
            _received(job, outcome, start)
    except BaseException:
        pool.terminate()
        raise


class CrossValidation:
    """One cross-validation in three steps, so that a comparison can train all its
    alternatives' folds as one batch: entering starts the MLflow parent run (when tracked),
    then the folds train (`run_sequential`, or its `job` by `run_parallel`, with other
    jobs or alone), and `finish` aggregates them (cv.json, the run's metrics); leaving ends
    the run."""

    def __init__(self, cfg: DictConfig, *, parent_run_id: str | None = None) -> None:
        self.cfg = cfg = prepare(cfg)
        refuse_resume(cfg, "cross-validation")
        check_tracking(cfg.tracking, cfg.paths.root)
        self.layout = Layout.from_cfg(cfg)
        self.folds = list(range(fold_count(cfg)))
        self.plain = to_container(cfg)
        self.parent_run_id = parent_run_id
        self.run: TrackedRun | None = None

    def __enter__(self) -> CrossValidation:
        cfg = self.cfg
        if cfg.tracking.enabled:
            run_name = cfg.tracking.run_name or f"cv-{cfg.name}-{cfg.model.name}-{cfg.data.name}"
            tags = {"dataset": cfg.data.name, "model": cfg.model.name, "cv_folds": str(cfg.data.split.folds),
                    **({"cv_repeats": str(cfg.cv.repeats)} if cfg.cv.repeats > 1 else {})}
            self.run = TrackedRun.start(**tracking_target(cfg.tracking, cfg.paths.root), run_name=run_name,
                                        parent_run_id=self.parent_run_id, tags=tags)
            try:
                self.run.log_params(flatten(self.plain))
            except BaseException as err:  # the run is ours to end: `with` does not call __exit__ now
                self.run.__exit__(type(err), err, err.__traceback__)
                raise
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self.run.__exit__(*exc) if self.run is not None else None

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run is not None else None

    def job(self, data: TrainingData | None = None, *, load: bool = True) -> FoldJob:
        """The folds as a job for `run_parallel`, on `data` (else read here). With `load`
        false the workers read the folders (local ones share this machine's), which are only
        checked here, memory-mapped, so that a stale split fails once, before any fold."""
        if not load:
            load_data(self.cfg, self.layout, in_memory=False)
        return FoldJob(self.plain, self.folds, self.run_id,
                       load_data(self.cfg, self.layout, data) if load else None)

    def run_sequential(self) -> list[dict[str, Any]]:
        """Every fold here, one after another, each reading the data folders."""
        results, start = [], time.monotonic()
        for fold in self.folds:
            results.append(run_fold(self.plain, fold, self.run_id))
            log.info(_fold_line(results[-1], self.plain, len(results), len(self.folds), time.monotonic() - start))
        return results

    def finish(self, results: list[dict[str, Any]], data: TrainingData | None = None) -> dict[str, Any]:
        """Aggregate the folds' results: writes `metrics/cv.json`, logs it to the run and
        returns it (see `cross_validate`). The test labels come from `data` (what parallel
        folds trained on) or, as sequential folds read them, from the data folders."""
        cfg, layout, repeats = self.cfg, self.layout, self.cfg.cv.repeats
        seconds = sum(r.pop(FOLD_SECONDS) for r in results)
        raw, splits = ((data.raw, data.splits) if data is not None
                       else (read_raw(layout.raw, in_memory=False), load_splits(layout.splits)))
        ensemble = fold_ensemble([r.pop(TEST_PROBS) for r in results], raw.labels[splits.test], raw.classes)
        # Repeated folds share data: their interval is the corrected one (a fold tests on one
        # of k parts and trains on k - 1); one repetition keeps the plain t-interval.
        factor = 1 / len(self.folds) + 1 / (cfg.data.split.folds - 1) if repeats > 1 else None
        summary = {key: summarize([r[key] for r in results], confidence=cfg.cv.confidence, variance_factor=factor)
                   for key in CV_METRICS if all(key in r for r in results)}
        # "folds" is per repetition; the values run repetition-major (rep * folds + i).
        out = {"folds": cfg.data.split.folds, **({"repeats": repeats} if repeats > 1 else {}),
               "confidence": cfg.cv.confidence,
               "model/params": results[0]["model/params"], "model/macs": results[0]["model/macs"], **summary,
               **ensemble}
        write_json(layout.metrics / "cv.json", file_row(out))
        if self.run is not None:
            self.run.log_metrics({f"cv/{key}/{stat}": value for key, stats in summary.items()
                                  for stat, value in stats.items() if stat in ("mean", "std", "ci_low", "ci_high")})
            self.run.log_metrics({f"cv/{key}": value for key, value in ensemble.items()})
            self.run.log_artifact(layout.metrics / "cv.json")
        # For the command's summary and a comparison; not in cv.json, a DVC metrics file.
        out[FOLD_SECONDS] = seconds
        if self.run_id is not None:
            out["mlflow_run_id"] = self.run_id
        return out


def cross_validate(cfg: DictConfig, *, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train one model per fold; writes `metrics/cv.json` (mean, std, 95% CI, per-fold values,
    and the fold ensemble's `ensemble/test/*`: every fold model's test probabilities averaged,
    as He et al. report their ensembles) and returns what it holds, keyed `val/acc` as in the
    code (the file has `val_acc`), `mlflow_run_id`: the CV run's (when tracked), and
    `FOLD_SECONDS`: the folds' training and evaluation time, summed.

    The CV run is an MLflow parent of the fold runs (and itself a child of `parent_run_id`,
    e.g. a comparison's run, when given).
    """
    run = CrossValidation(cfg, parent_run_id=parent_run_id)
    if not parallel_folds(run.cfg.cv, run.cfg.tune, len(run.folds)):
        with run:
            return run.finish(run.run_sequential())
    # The pool's workers start before the run does: their imports overlap its MLflow set-up.
    with local_fold_pool(run.cfg, len(run.folds)) as pool, run:
        job = run.job(load=pool is None)
        run_parallel([job], pool)
        return run.finish(job.results(), job.data)


def cv(cfg: DictConfig) -> dict[str, Any]:
    """The cv task (`pipeline cv`, the DVC `cv` stage): with `cv.nested`, nested
    cross-validation of the whole sweep (`pipeline.tasks.nested`: the estimate of "tune, then
    train"); else `cross_validate`, of the configuration as it is. `pipeline compare` always
    cross-validates its alternatives plainly."""
    if cfg.cv.get("nested") is True:
        from pipeline.tasks.nested import nested_cross_validate

        return nested_cross_validate(cfg)
    return cross_validate(cfg)


def check_cv(cfg: DictConfig) -> DictConfig:
    """Validate what `cv` will run, before any data or run: the prepared config."""
    if cfg.cv.get("nested") is True:
        from pipeline.tasks.nested import check_nested_cv

        return check_nested_cv(cfg)
    return prepare(cfg)
