"""Issue #13, scenarios 7 and 8 (training): bad configs are refused cleanly, and training is
repeatable bit for bit.

7. Hypothesis generates bad overrides (unknown keys, wrong types, out-of-range values,
   malformed `tune.space` strings, bad group options and grids) for `pipeline train`, `tune`,
   `cv` and `compare`, run in this process exactly as the console script runs them
   (`pipeline.cli.main.main(argv)`), each in its own empty project folder: exit 2, no
   traceback, a message naming the key, and nothing left behind (no MLflow store, no Hydra
   run folder, no data). A few cases also go through the real `pipeline` process, which must
   answer the same.
8. The same config and seed trained twice: every epoch's logged metrics and every tensor of
   best.ckpt and last.ckpt are equal (CPU).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from pipeline.cli.main import main
from pipeline.config import compose
from pipeline.data.sources import list_sources
from pipeline.models import model_defaults
from pipeline.models.init import INITS
from pipeline.models.layers import ACTIVATIONS, SHAPED_ACTIVATIONS
from pipeline.tasks.data import ensure_data
from pipeline.tasks.train import train
from pipeline.training.metrics import EPOCH_METRICS
from pipeline.training.optim import OPTIMIZERS
from pipeline.training.regularizers import regularizer_defaults
from pipeline.training.schedules import scheduler_keys
from procs import BIN, project_env

REPO = Path(__file__).resolve().parents[1]
JOBS = ("train", "tune", "cv", "compare")
# Small runs, should a bad value slip through (the test then fails, but not after an hour).
BASE = {
    "train": ["model=mlp", "trainer.max_epochs=1"],
    "tune": ["model=mlp", "tune.num_samples=1", "tune.max_epochs=1", "tune.asha.grace_period=1"],
    "cv": ["model=mlp", "trainer.max_epochs=1", "data.split.folds=2"],
    "compare": ["trainer.max_epochs=1", "data.split.folds=2"],
}


# ---------------------------------------------------------------------------- running a case

@dataclass
class Outcome:
    status: int | str          # the exit status, or the exception that escaped main()
    stderr: str
    left: list[str]            # what the command left in the project folder
    runs: int                  # MLflow runs in the project's store


def _project(root: Path) -> Path:
    """An empty project folder: a dvc.yaml makes it the root that relative paths start from."""
    root.mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    return root


def _inspect(project: Path) -> tuple[list[str], int]:
    left = sorted(str(p.relative_to(project)) for p in project.iterdir() if p.name != "dvc.yaml")
    db = project / "mlflow.db"
    runs = 0
    if db.exists():
        with contextlib.closing(sqlite3.connect(db)) as con:
            with contextlib.suppress(sqlite3.Error):  # no tables yet: no runs either
                runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    return left, runs


def run_in_process(project: Path, job: str, overrides: list[str]) -> Outcome:
    """`pipeline <job> <overrides>` in this process, from `project`, as the console script
    runs it: `main(argv)`, its return value the exit status."""
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(project)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                status: int | str = main([job, *overrides])
            except SystemExit as stop:  # what the interpreter would turn into the status
                status = stop.code if isinstance(stop.code, int) else 1
            except Exception as escaped:  # the interpreter would print a traceback and exit 1
                status = f"{type(escaped).__name__}: {escaped}"
    finally:
        os.chdir(cwd)
    return Outcome(status, err.getvalue(), *_inspect(project))


def run_process(project: Path, job: str, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "pipeline"), job, *overrides], cwd=project, env=project_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------------------- bad overrides

@dataclass(frozen=True)
class Case:
    job: str
    overrides: tuple[str, ...]  # after the job's BASE, so they win
    key: str                    # what the error message must name
    kind: str

    def argv(self) -> list[str]:
        return [*BASE[self.job], *self.overrides]


def _composed_keys() -> dict[str, set[str]]:
    """Every block's keys as conf/ composes them for the cases' base configs."""
    keys: dict[str, set[str]] = {}
    for job in JOBS:
        cfg = compose(BASE[job], conf=REPO / "conf")

        def walk(node, prefix: str) -> None:
            keys.setdefault(prefix, set()).update(node.keys())
            for k, v in node.items():
                if hasattr(v, "keys"):
                    walk(v, f"{prefix}.{k}" if prefix else k)

        walk(cfg, "")
    return keys


KEYS = _composed_keys()
# Keys a block takes that conf/ does not spell out: builders' own arguments and registered
# regularizers (models and optimizers of the cases' base configs).
EXTRA = {"model": {*model_defaults("mlp"), *model_defaults("minivgg"), *model_defaults("lenet5"), "input_size"},
         "regularizer": set(regularizer_defaults()),
         "optimizer": set(OPTIMIZERS["adam"].keys),
         "scheduler": scheduler_keys("step") | {"decay"}}
CLOSED = [b for b in KEYS if not b.startswith(("tune.space", "tune.fixed"))]
IDENT = st.from_regex(r"[a-z][a-z_]{0,9}[a-z]", fullmatch=True)
WORD = st.from_regex(r"[a-z]{3,8}", fullmatch=True).filter(
    lambda w: w not in ("true", "false", "null", "none", "nan", "inf", "yes", "no", "on", "off", "warn"))


@st.composite
def unknown_key(draw, job: str) -> Case:
    block = draw(st.sampled_from([b for b in CLOSED if job == "tune" or not b.startswith("tune")]))
    name = draw(IDENT.filter(lambda n: n not in KEYS[block] | EXTRA.get(block, set())))
    key = f"{block}.{name}" if block else name
    plus = draw(st.sampled_from(["", "+", "++"]))
    value = draw(st.sampled_from(["1", "0.5", "true", "abc", "[1,2]"]))
    return Case(job, (f"{plus}{key}={value}",), key, "unknown key")


# key -> (integer?, values that must be refused); the ranges the pipeline documents.
NEG = st.integers(max_value=-1)
NONPOS = st.integers(max_value=0)
NEG_F = st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False)
ABOVE_1 = st.floats(min_value=1.000001, max_value=1e6)
OUT_OF_RANGE = {
    "seed": NEG,
    "data.batch_size": NONPOS,
    "data.eval_batch_size": NONPOS,
    "data.num_workers": NEG,
    "data.resize": NONPOS,
    "data.channels": NONPOS,
    "data.image_size": NONPOS,
    "data.num_classes": st.integers(max_value=1),
    "data.split.val_fraction": NEG_F | st.floats(min_value=1, max_value=10),
    "data.split.test_fraction": NEG_F | st.floats(min_value=1, max_value=10),
    "data.split.folds": st.integers(max_value=1),
    "data.split.seed": NEG,
    "data.fold": NEG | st.integers(min_value=5, max_value=100),
    "trainer.max_epochs": NONPOS,
    "trainer.gradient_clip_val": NONPOS,
    "trainer.limit_train_batches": NONPOS | st.floats(min_value=1.01, max_value=1.99),
    "trainer.limit_val_batches": NEG | st.floats(min_value=1.01, max_value=1.99),
    "cv.cpus_per_fold": NONPOS,
    "cv.confidence": NEG_F | st.floats(min_value=1, max_value=100),
    "compare.alpha": NEG_F | st.floats(min_value=1, max_value=100),
    "init.std": NONPOS,
    "transfer.pretrained_lr_ratio": NEG_F,
    "optimizer.lr": NONPOS | NEG_F,
    "optimizer.weight_decay": NEG_F,
    "scheduler.step_size": NONPOS,
    "scheduler.gamma": NEG_F | st.floats(min_value=1.01, max_value=100),
    "scheduler.warmup_epochs": NEG,
    "model.dropout": NEG_F | st.floats(min_value=1, max_value=10),
    "regularizer.dropout": NEG_F | st.floats(min_value=1, max_value=10),
    "regularizer.l1": NEG_F,
    "regularizer.l2": NEG_F,
    "regularizer.weight_decay": NEG_F,
    "regularizer.label_smoothing": NEG_F | st.floats(min_value=1, max_value=10),
    "regularizer.early_stopping.patience": NEG,
    "regularizer.augment.hflip": NEG_F | ABOVE_1,
    "regularizer.augment.crop_padding": NEG,
    "regularizer.augment.cutout": NEG,
}
TUNE_OUT_OF_RANGE = {
    "tune.num_samples": NONPOS,
    "tune.max_epochs": NONPOS,
    "tune.max_concurrent_trials": NONPOS,
    "tune.resources.cpu": NONPOS,
    "tune.resources.gpu": NEG,
    "tune.workers": NONPOS,
    "tune.num_cpus": NONPOS,
    "tune.time_budget_s": NONPOS,
    "tune.max_failures": st.integers(max_value=-2),
    "tune.asha.grace_period": NONPOS | st.integers(min_value=2, max_value=100),  # tune.max_epochs=1
    "tune.asha.reduction_factor": st.floats(max_value=1, allow_nan=False, allow_infinity=False),
}


def _number(value: float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


@st.composite
def out_of_range(draw, job: str) -> Case:
    table = {**OUT_OF_RANGE, **(TUNE_OUT_OF_RANGE if job == "tune" else {})}
    key = draw(st.sampled_from(sorted(table)))
    return Case(job, (f"{key}={_number(draw(table[key]))}",), key, "out of range")


# Keys of a type (bool, int, number), and values of the wrong one.
BOOLS = ["data.normalize", "compare.higher_is_better", "tracking.enabled", "tracking.log_model",
         "trainer.deterministic", "trainer.enable_progress_bar", "regularizer.early_stopping.enabled",
         "model.batch_norm"]
INTS = ["seed", "data.batch_size", "data.eval_batch_size", "data.num_workers", "data.split.folds",
        "data.split.seed", "trainer.max_epochs", "cv.cpus_per_fold", "scheduler.step_size",
        "regularizer.early_stopping.patience", "regularizer.augment.cutout"]
NUMBERS = ["optimizer.lr", "optimizer.eps", "scheduler.gamma", "model.dropout", "regularizer.l2", "init.std",
           "cv.confidence", "compare.alpha", "data.split.val_fraction", "transfer.pretrained_lr_ratio",
           "regularizer.augment.rotation"]
TUNE_BOOLS = ["tune.resume", "tune.use_best", "tune.cv"]
TUNE_INTS = ["tune.num_samples", "tune.max_epochs", "tune.workers"]
NOT_A_NUMBER = WORD | st.sampled_from(["[1,2]", "{a: 1}", "true", "null", "nan", "inf", "-inf"])
NOT_AN_INT = NOT_A_NUMBER | st.floats(min_value=0.5, max_value=1e4).filter(lambda f: not f.is_integer()).map(repr)
NOT_A_BOOL = WORD | st.integers().map(str) | st.sampled_from(["[true]", "{a: 1}", "null", "0.5"])
NOT_A_STRING = st.integers(min_value=-5, max_value=5).map(str) | st.sampled_from(["[a,b]", "{a: 1}", "true", "0.5"])


def _not_one_of(*names: str) -> st.SearchStrategy[str]:
    return NOT_A_STRING | WORD.filter(lambda w: w not in names)


# String keys: any word where a name is free (tracking.experiment_name), else not one of the choices.
STRINGS = {
    "tracking.tracking_uri": _not_one_of(),  # a word is no URI either
    "tracking.experiment_name": NOT_A_STRING,
    "trainer.accelerator": _not_one_of("cpu", "gpu", "cuda", "mps", "auto", "tpu", "hpu"),
    "trainer.precision": _not_one_of(),
    "optimized_metric": _not_one_of(),
    "data.name": _not_one_of(*list_sources()),
    "init.scheme": _not_one_of("default", *INITS),
    "compare.metric": _not_one_of(),
    "regularizer.tta": _not_one_of("none", "flip", "ten_crop"),
    "cv.parallel": NOT_A_BOOL.filter(lambda v: v != "auto"),  # true, false or auto
    "model.activation": _not_one_of(*ACTIVATIONS, *SHAPED_ACTIVATIONS),
}
TUNE_STRINGS = {
    "tune.name": NOT_A_STRING,
    "tune.search_alg": _not_one_of("random", "grid", "optuna"),
    "tune.scheduler": _not_one_of("fifo", "asha", "hyperband", "pbt"),
    "tune.metric": _not_one_of(),
    "tune.mode": _not_one_of("min", "max"),
}


@st.composite
def wrong_type(draw, job: str) -> Case:
    tune = job == "tune"
    typed = {**{k: NOT_A_BOOL for k in BOOLS + (TUNE_BOOLS if tune else [])},
             **{k: NOT_AN_INT for k in INTS + (TUNE_INTS if tune else [])},
             **{k: NOT_A_NUMBER for k in NUMBERS}, **STRINGS, **(TUNE_STRINGS if tune else {})}
    key = draw(st.sampled_from(sorted(typed)))
    return Case(job, (f"{key}={draw(typed[key])}",), key, "wrong type")


GROUPS = ["data", "model", "optimizer", "scheduler", "trainer", "tracking", "experiment"]


@st.composite
def bad_option(draw, job: str) -> Case:
    group = draw(st.sampled_from(GROUPS + (["tune"] if job == "tune" else [])))
    options = {p.stem for p in (REPO / "conf" / group).glob("*.yaml")}
    name = draw(IDENT.filter(lambda n: n not in options))
    if draw(st.booleans()):
        return Case(job, (f"{group}={name}",), group, "bad group option")
    # A list of regularizers with one unknown among real ones.
    return Case(job, (f"regularizer=[dropout,{name}]",), "regularizer", "bad group option")


# tune.space: a searchable key and a malformed distribution string.
SPACE_KEYS = ["optimizer.lr", "regularizer.dropout", "scheduler.decay", "model", "optimizer"]
NUM = st.sampled_from(["1", "0", "-1", "1e-4", "0.5", "a", "", " ", "inf", "nan", "1,2", "[1]", "true"])


@st.composite
def bad_distribution(draw) -> str:
    name = draw(st.sampled_from(["loguniform", "uniform", "quniform", "randint", "normal", "lognormal"]) | WORD)
    form = draw(st.sampled_from(["call", "call_open", "list", "list_open", "low_high", "word"]))
    if form == "call":  # wrong arity or non-numbers, or an unknown distribution
        args = draw(st.lists(NUM, max_size=4))
        return f"{name}({', '.join(args)})"
    if form == "call_open":
        return f"{name}({draw(NUM)}, "
    if form == "list":
        kind = draw(st.sampled_from(["choice", "grid"]) | WORD)
        return f"{kind}[{draw(st.sampled_from(['', ',', 'a,,b', ' , ', '1,', ',2']))}]"
    if form == "list_open":
        return f"{draw(st.sampled_from(['choice', 'grid']))}[{draw(st.sampled_from(['', 'a', '1, 2']))}"
    if form == "low_high":  # well formed, but low >= high, or loguniform's low <= 0
        kind = draw(st.sampled_from(["loguniform", "uniform", "randint"]))
        low = draw(st.integers(-3, 3))
        high = draw(st.integers(-5, low)) if kind != "loguniform" or low > 0 else draw(st.integers(low + 1, 5))
        return f"{kind}({low}, {high})"
    return draw(WORD)


@st.composite
def bad_space(draw) -> Case:
    key = draw(st.sampled_from(SPACE_KEYS))
    if key in ("model", "optimizer") and draw(st.booleans()):
        # A group searched over options that do not exist, or by a numeric distribution.
        text = draw(st.sampled_from([f"choice[mlp, {draw(IDENT)}1]" if key == "model" else f"choice[adam, {draw(IDENT)}1]",
                                     "uniform(0, 1)", "loguniform(1e-3, 1)"]))
    else:
        text = draw(bad_distribution())
    quote = draw(st.sampled_from(["'", "\""]))  # quoted: Hydra hands the text over as it is
    if draw(st.integers(0, 5)) == 0:
        # Unquoted: Hydra parses it itself and refuses most; whatever it hands over must fail.
        return Case("tune", (f"++tune.space.{key}={text}",), f"tune.space.{key}", "search space (unquoted)")
    return Case("tune", (f"++tune.space.{key}={quote}{text}{quote}",), f"tune.space.{key}", "search space")


@st.composite
def bad_sweep(draw) -> Case:
    """Sweep settings that only make sense together, each fine on its own."""
    word = draw(IDENT)
    cases = [
        (("++tune.space.optimizer.lrr='loguniform(1e-4, 1e-2)'",), "tune.space.optimizer.lrr"),
        ((f"++tune.space.{word}.lr='uniform(0, 1)'",), f"tune.space.{word}.lr"),
        ((f"++tune.fixed.scheduler={word}1",), "tune.fixed.scheduler"),
        (("tune.search_alg=grid",), "tune.space"),  # grid over loguniform(...) values
        (("tune.search_alg=optuna", "tune.scheduler=pbt"), "tune.scheduler"),
        (("tune.scheduler=pbt", f"tune.pbt.mutate=[{word}]"), "tune.pbt.mutate"),
        (("++tune.space.regularizer.dropout='uniform(0.5, 1.5)'",), "regularizer.dropout"),
        (("tune.cv=true", "tune.scheduler=pbt"), "tune.cv"),
        (("tune.cv=true", "data.fold=0"), "data.fold"),
        (("tune.space={}",), "tune.space"),
        (("tune.space=5",), "tune.space"),
    ]
    overrides, key = draw(st.sampled_from(cases))
    return Case("tune", overrides, key, "sweep settings")


@st.composite
def bad_grid(draw) -> Case:
    word = draw(IDENT)
    grid = draw(st.sampled_from([
        (f"[{{model: [mlp, {word}1]}}]", "compare.grid"),
        (f"[{{optimizer: [adam, {word}1]}}]", "compare.grid"),
        (f"[{{model: [mlp]}}, {{regularizer: [none, {word}1]}}]", "compare.grid"),
        (f"[{{model: [mlp]}}, {{optimizer.lr: [0.01, {draw(WORD)}]}}]", "optimizer.lr"),
        (f"[{{model: [mlp]}}, {{model.dropout: [0.1, {draw(st.integers(1, 9))}]}}]", "model.dropout"),
        (f"[{{model: [mlp]}}, {{{word}.zz: [1, 2]}}]", f"{word}.zz"),
        ("[{model: []}]", "compare.grid"),
        ("[]", "compare.grid"),
        ("[mlp, lenet5]", "compare.grid"),
        (str(draw(st.integers())), "compare.grid"),
    ]))
    return Case("compare", (f"compare.grid={grid[0]}",), grid[1], "bad grid")


def cases() -> st.SearchStrategy[Case]:
    def for_job(job: str) -> st.SearchStrategy[Case]:
        common = unknown_key(job) | out_of_range(job) | wrong_type(job) | bad_option(job)
        if job == "tune":
            return common | bad_space() | bad_space() | bad_sweep()
        if job == "compare":
            return common | bad_grid()
        return common

    return st.sampled_from(JOBS).flatmap(for_job)


def check(case: Case, outcome: Outcome) -> None:
    shown = f"pipeline {case.job} {' '.join(case.argv())}\n{outcome.stderr}"
    assert outcome.status == 2, shown
    assert "Traceback" not in outcome.stderr, shown
    assert case.key in outcome.stderr, shown
    assert outcome.left == [] and outcome.runs == 0, shown


# ---------------------------------------------------------------------------- 7. config fuzzing

# The in-process runs are the real command: these go through the console script as well,
# which must answer alike (status, message, what is left behind).
THROUGH_THE_SCRIPT = [
    Case("train", ("optimizer.lr=abc",), "optimizer.lr", "wrong type"),
    Case("tune", ("++tune.space.optimizer.lr='loguniform(1, )'",), "tune.space.optimizer.lr", "search space"),
    Case("cv", ("+trainer.bogus=1",), "trainer.bogus", "unknown key"),
    Case("compare", ("compare.grid=[{model: [mlp, nosuch]}]",), "compare.grid", "bad grid"),
]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.fault("7. Config fuzzing", fault="Hypothesis-generated bad overrides (unknown keys, wrong types, "
                   "out-of-range values, malformed tune.space strings, bad group options and grids) for "
                   "pipeline train, tune, cv, compare",
                   expected="exit 2 naming the key; no traceback; no MLflow run, no output folder")
def test_bad_overrides_are_refused_cleanly(tmp_path, observe, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # as a user's shell has it
    # The console-script cases run while the fuzzer does (they mostly wait on imports).
    procs = [(case, project, run_process(project, case.job, case.argv()))
             for case, project in ((c, _project(tmp_path / f"script{i}")) for i, c in enumerate(THROUGH_THE_SCRIPT))]
    ran: Counter[str] = Counter()
    left = {"runs": 0, "outputs": 0}

    def tally(outcome: Outcome) -> Outcome:
        left["runs"] += outcome.runs
        left["outputs"] += len(outcome.left)
        return outcome

    @settings(max_examples=80, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=cases())
    def refused(case: Case) -> None:
        project = _project(tmp_path / f"case{sum(ran.values())}")
        ran[case.job] += 1
        check(case, tally(run_in_process(project, case.job, case.argv())))

    try:
        refused()
    except BaseException:
        for _, _, proc in procs:
            proc.kill()
            proc.wait()
        raise
    for i, (case, project, proc) in enumerate(procs):
        _, stderr = proc.communicate(timeout=300)
        by_script = tally(Outcome(proc.returncode, stderr, *_inspect(project)))
        here = tally(run_in_process(_project(tmp_path / f"here{i}"), case.job, case.argv()))
        check(case, by_script)
        assert (here.status, here.stderr.strip()) == (by_script.status, by_script.stderr.strip())
        ran[case.job] += 1

    n = sum(ran.values())
    observe.saw(f"{n} cases ({', '.join(f'{job} {ran[job]}' for job in JOBS)}): every one exit 2 naming the key, "
                f"no traceback; {len(procs)} of them through the `pipeline` script too, answering alike")
    lost = observe.lost(runs=left["runs"], outputs=left["outputs"])
    assert lost == {"runs": 0, "metrics": 0, "checkpoints": 0, "outputs": 0}
    assert all(ran[job] for job in JOBS)


# ---------------------------------------------------------------------------- 8. determinism

def _history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric the run logged per epoch, as (step, value) lists; wall-clock times aside."""
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("time/")]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


@pytest.mark.integration
@pytest.mark.fault("8. Determinism", fault="the same config and seed trained twice (mlp, digits, 2 epochs, "
                   "dropout, CPU)", expected="bit-identical per-epoch metrics and best/last.ckpt tensors")
def test_the_same_config_and_seed_train_bit_identically(cfg_factory, tmp_path, observe):
    epochs = 2
    runs = []
    for name in ("first", "second"):
        # Dropout and shuffling draw from the seeded generators: a leak would show.
        cfg = cfg_factory(["model=mlp", "model.dropout=0.3", "seed=7", "tune.use_best=false"], epochs=epochs)
        with open_dict(cfg):
            cfg.paths.out_dir = str(tmp_path / name)
        ensure_data(cfg)
        summary = train(cfg)
        models = Path(cfg.paths.out_dir) / "models"
        runs.append((summary, models, json.loads((models / "run.json").read_text())))

    client = MlflowClient(runs[0][2]["tracking_uri"])
    first, second = (_history(client, run["run_id"]) for _, _, run in runs)
    # The per-epoch curves, each logged once an epoch (the rest once a run: sizes, the best epoch's).
    logged = [sum(len(history.get(k, [])) for k in EPOCH_METRICS) for history in (first, second)]
    expected = epochs * len(EPOCH_METRICS)
    assert first == second  # every epoch's every metric, to the last bit
    assert {k: v for k, v in runs[0][0].items() if not k.startswith("time/")} == \
        {k: v for k, v in runs[1][0].items() if not k.startswith("time/")}

    tensors = 0
    for ckpt in ("best.ckpt", "last.ckpt"):
        a, b = (torch.load(models / ckpt, map_location="cpu", weights_only=False)["state_dict"] for _, models, _ in runs)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{ckpt}: {key} differs"
            tensors += 1
    observe.saw(f"2 runs x {epochs} epochs: {sum(map(len, first.values()))} logged metric values equal, {tensors} checkpoint tensors "
                "equal (best.ckpt, last.ckpt)")
    lost = observe.lost(metrics=sum(expected - n for n in logged),
                        checkpoints=sum(not (models / c).exists() for _, models, _ in runs for c in ("best.ckpt", "last.ckpt")))
    assert lost == {"runs": 0, "metrics": 0, "checkpoints": 0, "outputs": 0}
