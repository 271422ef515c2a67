"""Configuration: composition, params.yaml agreement, and validation before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from pipeline.config import compose
from pipeline.errors import ConfigError
from pipeline.models import min_image_size
from pipeline.validation import prepare

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_committed_params_yaml_equals_the_composition(tmp_path):
    # The same function DVC calls on `dvc exp run` (hydra.enabled), so this is exactly its output.
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(CONF), None, "config", str(tmp_path), [])
    assert out.read_text() == (REPO / "params.yaml").read_text(), "params.yaml is stale: run `make params`"


def test_dvc_config_enables_hydra():
    text = (REPO / ".dvc" / "config").read_text()
    assert "[hydra]" in text and "enabled = true" in text


@pytest.mark.parametrize("group", ["data", "model", "optimizer", "scheduler", "trainer", "tracking", "regularizer"])
def test_every_group_option_composes_and_validates(group, tmp_path):
    root = tmp_path.resolve()
    for option in _options(group):
        overrides = [f"{group}={option}", f"paths.root={root}"]
        if option == "imagefolder":
            overrides.append("data.path=/nonexistent/images")
        cfg = compose(overrides, conf=CONF)
        if group == "model" and min_image_size(cfg.model.name) > cfg.data.image_size:
            # ImageNet-style designs need bigger inputs than digits: validate them upsampled.
            cfg = compose([*overrides, f"data.resize={min_image_size(cfg.model.name)}"], conf=CONF)
        out = prepare(cfg)
        # Valid as composed: the option's values come through unchanged, the paths rooted.
        assert OmegaConf.to_container(out[group]) == OmegaConf.to_container(cfg[group]), option
        assert out[group].get("name", option) == option  # groups with a name are named by file
        assert (Path(out.paths.data_dir), Path(out.paths.out_dir)) == (root / "data", root), option


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose([f"experiment={experiment}"], conf=CONF)
    prepare(cfg)
    assert cfg.name == experiment


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=abc", r"optimizer\.lr must be a number, got 'abc'"),
        ("optimizer.lr=-0.1", r"optimizer\.lr=-0\.1 is out of range: it must be > 0"),
        ("model.dropout=1.0", r"model\.dropout=1\.0 is out of range: it must be >= 0 and < 1"),
        ("model.dropout=-0.2", r"model\.dropout=-0\.2 is out of range"),
        ("data.batch_size=0", r"data\.batch_size=0 is out of range"),
        ("trainer.max_epochs=2.5", r"trainer\.max_epochs must be an integer"),
        ("regularizer.early_stopping.patience=-1", r"regularizer\.early_stopping\.patience=-1"),
        ("regularizer.augment.rotation=400", r"regularizer\.augment\.rotation=400"),
        ("regularizer.tta=five_crop", r"regularizer\.tta"),
        ("regularizer.l2=-1", r"regularizer\.l2=-1"),
        ("regularizer.dropout=1", r"regularizer\.dropout=1"),
        ("scheduler.gamma=2", r"scheduler\.gamma=2 is out of range"),
        ("data.split.test_fraction=1.5", r"data\.split\.test_fraction=1\.5"),
        ("+model.bogus=3", r"model\.bogus is not a key of model"),
        ("model.batch_norm=cos", r"model\.batch_norm='cos' is not a norm"),
        ("model.activation=swishy", r"model\.activation='swishy': Unknown activation 'swishy'"),
        ("optimizer=sgd optimizer.momentum=1.5", r"optimizer\.momentum=1\.5"),
        # Keys no regularizer registry entry owns.
        ("+regularizer.dropuot=0.3", r"regularizer\.dropuot is not a key of regularizer; .*Did you mean 'dropout'"),
        ("+regularizer.elastic.alhpa=1", r"regularizer\.elastic\.alhpa is not a key of regularizer\.elastic"),
        ("regularizer.elastic=0.1", r"regularizer\.elastic must be a block with keys alpha, l1_ratio"),
        # Keys of the other blocks, which nothing would read (found by tests/test_faults_config.py).
        ("+trainer.max_epoch=3", r"trainer\.max_epoch is not a key of trainer; .*Did you mean 'max_epochs'"),
        ("+data.split.fold=2", r"data\.split\.fold is not a key of data\.split; .*Did you mean 'folds'"),
        ("+tune.asha.grace=2", r"tune\.asha\.grace is not a key of tune\.asha"),
        ("+sed=1", r"sed is not a key of the config; .*Did you mean 'seed'"),
        ("data.split=5", r"data\.split must be a block of keys"),
        # Values Lightning or MLflow would refuse only once the run had started.
        ("trainer.precision=banana", r"trainer\.precision='banana' is not one of"),
        ("trainer.accelerator=gpuu", r"trainer\.accelerator='gpuu' is not one of"),
        ("trainer.devices=0", r"trainer\.devices=0 must be auto"),
        ("trainer.deterministic=maybe", r"trainer\.deterministic must be true or false"),
        ("trainer.limit_train_batches=1.5", r"trainer\.limit_train_batches=1\.5 must be a count"),
        ("trainer.limit_val_batches=0", r"trainer\.limit_val_batches=0 is out of range"),
        ("optimized_metric=val/loss", r"optimized_metric='val/loss' is not one of"),
        ("tracking.experiment_name=-3", r"tracking\.experiment_name must be a non-empty string"),
        ("data.download=maybe", r"data\.download must be true or false"),
        ("data.in_memory=maybe", r"data\.in_memory='maybe' is not one of auto, true, false"),
        ("data.in_memory=1", r"data\.in_memory=1 is not one of auto, true, false"),
    ],
)
def test_bad_values_fail_naming_the_key(override, message):
    cfg = compose(override.split(), conf=CONF)
    with pytest.raises(ConfigError, match=message):
        prepare(cfg)


def test_model_too_small_for_input_fails_before_training():
    cfg = compose(["model=minivgg", "model.widths=[8,8,8,8]"], conf=CONF)  # 8 px cannot pool 4 times
    with pytest.raises(ConfigError, match="minivgg"):
        prepare(cfg)


def test_relative_paths_are_made_absolute(tmp_path):
    cfg = compose([], conf=CONF)
    with open_dict(cfg):
        cfg.paths.root = str(tmp_path)
    out = prepare(cfg)
    assert Path(out.paths.data_dir) == tmp_path / "data"
    assert Path(out.paths.out_dir) == tmp_path
    assert OmegaConf.select(cfg, "paths.data_dir") == "data"  # the input is not mutated


def _cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "pipeline", "train", *overrides, f"paths.root={tmp_path}",
                           f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_job_name_joins_the_users_overrides_wherever_they_are():
    from pipeline.cli.apps import _with_job_name

    assert _with_job_name("train", ["--cfg", "job", "model=lenet5"]) == \
        ["--cfg", "job", "hydra.job.name=train", "model=lenet5"]
    assert _with_job_name("cv", ["model=mlp", "-m", "--cfg", "job"]) == ["hydra.job.name=cv", "model=mlp", "-m", "--cfg", "job"]
    assert _with_job_name("tune", ["--info", "searchpath"]) == ["--info", "searchpath", "hydra.job.name=tune"]


def test_cli_prints_the_composed_config_with_flags_before_overrides(tmp_path):
    result = _cli(tmp_path, "--cfg", "job", "model=lenet5")
    assert result.returncode == 0, result.stderr
    assert "name: lenet5" in result.stdout and "activation: tanh" in result.stdout


def test_cli_unknown_option_lists_choices(tmp_path):
    result = _cli(tmp_path, "model=nosuch")
    assert result.returncode != 0
    assert "nosuch" in result.stderr
    for choice in _options("model"):
        assert choice in result.stderr


@pytest.mark.parametrize("override, key", [("optimizer.lr=abc", "optimizer.lr"), ("model.dropout=1.5", "model.dropout"),
                                           ("report.evolution_epochs=[0]", "report.evolution_epochs")])
def test_cli_bad_value_exits_before_reading_data_or_creating_a_run(tmp_path, override, key):
    result = _cli(tmp_path, override)
    assert result.returncode == 2
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "run").exists()  # nor the run folder Hydra had made for it
    assert tmp_path.is_dir()  # but the folder it ran in, which was not Hydra's to make
