"""The regularizer registry: what each entry declares, how the config reaches it, and adding
one (a confidence penalty) in the test itself: one registered class plus one YAML file."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

import sweeps
from pipeline.config import check_number, compose, to_container
from pipeline.errors import ConfigError
from pipeline.training.regularizers import (
    Regularizer,
    Regularizers,
    list_regularizers,
    register_regularizer,
    registry,
    regularizer_defaults,
)
from pipeline.tuning.plan import pbt_keys, plan_sweep
from pipeline.validation import prepare

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry is a module-level table: entries a test registers vanish after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_the_base_block_in_config_yaml_holds_the_registry_defaults():
    # conf/config.yaml lists keys for users to read and override; where it lists one, its
    # value must be the code's default. A new entry need not be listed (prepare fills it in).
    base, defaults = to_container(compose([], conf=CONF).regularizer), regularizer_defaults()
    assert {k: defaults.get(k) for k in base} == base


def test_every_entry_says_where_it_acts():
    assert list_regularizers() == {
        "augment": ["transform_batch"], "early_stopping": ["callbacks"], "l1": ["loss_terms"],
        "l2": ["loss_terms"], "elastic": ["loss_terms"], "label_smoothing": ["criterion_kwargs"],
        "dropout": ["model_kwargs"], "conv_dropout": ["model_kwargs"], "batch_norm": ["model_kwargs"],
        "tta": ["probabilities"], "weight_decay": ["before_optimizer_step"],
    }
    assert pbt_keys() == ["optimizer.lr", "regularizer.dropout"]


def test_a_duplicate_key_or_a_missing_check_is_an_error(scratch_registry):
    with pytest.raises(ValueError, match="'l2' is already registered"):
        register_regularizer("l2", default=0.0)(type("L2Again", (Regularizer,), {}))
    with pytest.raises(TypeError, match="'unchecked' .* must define its own `check`"):
        register_regularizer("unchecked", default=0.0)(type("Unchecked", (Regularizer,), {}))


def test_hooks_run_only_for_active_entries():
    off = Regularizers({})
    assert not any(off.acts(hook) for hook in ("loss_terms", "transform_batch", "model_kwargs"))
    assert off.acts("callbacks")  # early stopping is on by default
    on = Regularizers({"l2": 0.1, "dropout": 0.3, "label_smoothing": 0.1, "augment": {"hflip": 0.5}})
    assert on.model_kwargs() == {"dropout": 0.3} and on.criterion_kwargs() == {"label_smoothing": 0.1}
    assert on.acts("transform_batch") and set(on.loss_terms(torch.nn.Linear(2, 2), None, None)) == {"l2"}


# ---------------------------------------------------------------------------- adding one in a test

def _register_confidence_penalty() -> type[Regularizer]:
    """What a contributor writes in `training/regularizers/<module>.py`."""

    @register_regularizer("confidence", default=0.0, pbt_mutable=True)
    class ConfidencePenalty(Regularizer):
        """- beta * H(p(y|x)): penalises confident, low-entropy predictions (Pereyra et al. 2017)."""

        @classmethod
        def check(cls, cfg: DictConfig, key: str) -> None:
            check_number(cfg, key, low=0)

        def loss_terms(self, net, logits, y):
            logp = F.log_softmax(logits, 1)
            return {"confidence": self.value * (logp.exp() * logp).sum(1).mean()}

    return ConfidencePenalty


def _conf_with_option(tmp: Path) -> Path:
    """A copy of conf/ plus what a contributor writes in `conf/regularizer/confidence.yaml`."""
    conf = tmp / "conf"
    shutil.copytree(CONF, conf)
    (conf / "regularizer" / "confidence.yaml").write_text(
        "# Confidence penalty (Pereyra et al. 2017): discourages over-confident predictions.\nconfidence: 0.1\n")
    return conf


def test_a_regularizer_is_one_registered_class_and_one_yaml_file(scratch_registry, digits_cfg, tmp_path):
    from pipeline.tasks.train import train

    conf = _conf_with_option(tmp_path)
    project = [f"paths.{k}={v}" for k, v in digits_cfg.paths.items() if v is not None]
    small = ["model=mlp", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "tracking.enabled=false",
             *project]
    with pytest.raises(ConfigError, match=r"regularizer\.confidence is not a key of regularizer"):
        prepare(compose(["regularizer=[confidence]", *small], conf=conf))  # the YAML alone is not enough

    _register_confidence_penalty()
    assert list_regularizers()["confidence"] == ["loss_terms"]
    assert "regularizer.confidence" in pbt_keys()
    # A config that does not select the option gets the default, so nothing else changes.
    assert prepare(compose(small, conf=conf)).regularizer.confidence == 0.0
    assert prepare(compose(["+regularizer.confidence=0.2", *small], conf=conf)).regularizer.confidence == 0.2
    with pytest.raises(ConfigError, match=r"regularizer\.confidence=-1 is out of range: it must be >= 0"):
        prepare(compose(["regularizer=[confidence]", "regularizer.confidence=-1", *small], conf=conf))
    # Sweeps see the key (filled in even where the base config lacks it), and PBT may perturb it.
    sweep = plan_sweep(compose([*small, *sweeps.space(**{"regularizer.confidence": "uniform(0.0, 0.3)"}),
                                "tune.scheduler=pbt", "tune.pbt.mutate=[regularizer.confidence]"], conf=conf))
    assert sweep.base["regularizer"]["confidence"] == 0.0

    cfg = compose(["regularizer=[dropout,confidence]", *small], conf=conf)
    assert cfg.regularizer.confidence == 0.1 and cfg.regularizer.dropout == 0.5
    metrics = train(cfg)
    (row,) = json.loads((Path(cfg.paths.out_dir) / "plots" / "train_curves.json").read_text())
    # Its hook acted: its term, -0.1 * entropy, was logged and is part of the training loss.
    assert -0.1 * math.log(10) <= row["train_loss_confidence"] < 0
    assert row["train_loss"] == pytest.approx(row["train_loss_ce"] + row["train_loss_confidence"], rel=1e-5)
    assert metrics["train/loss_confidence"] == row["train_loss_confidence"]


@pytest.mark.parametrize("model", ["mlp", "lenet5", "minivgg", "resnet20"])
def test_none_switches_off_only_what_each_model_has(model) -> None:
    """regularizer=none is the baseline of any comparison: it must compose with models that
    lack an option it switches off (lenet5 and the MLP have no conv dropout)."""
    from pipeline.models import model_defaults
    from pipeline.validation import model_args

    args = model_args(prepare(compose([f"model={model}", "regularizer=none"], conf=CONF)), num_classes=10)
    has = model_defaults(model)
    assert all(args[k] in (0, False) for k in ("dropout", "conv_dropout", "batch_norm") if k in has)
    assert set(args) - {"name", "in_channels", "num_classes", "image_size"} <= set(has)


def test_switching_on_an_option_the_model_lacks_names_it() -> None:
    with pytest.raises(ConfigError, match="conv_dropout"):
        prepare(compose(["model=lenet5", "regularizer.conv_dropout=0.2"], conf=CONF))
