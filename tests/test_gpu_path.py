"""The GPU path, on the CPU: the device cache (`data.device_cache=true` batches on the CPU with
the code a GPU runs), bf16 mixed precision, channels_last and torch.compile as config switches,
and their refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from pipeline.data.batches import TensorBatches
from pipeline.data.device import DeviceBatches, DeviceCache, choose_device_cache
from pipeline.errors import ConfigError
from pipeline.validation import prepare
from procs import REPO


def _pairs(a, b):
    out = list(zip(a, b, strict=True))
    assert out
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_device_batches_are_the_host_batches(channels):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 5, 6, channels), dtype=np.uint8)
    labels = rng.integers(0, 4, 37)
    indices = rng.permutation(37)[:29]
    cache = DeviceCache(images, labels, "cpu")
    assert cache.images.shape == (37, channels, 5, 6) and cache.images.device.type == "cpu"
    for kwargs in ({"batch_size": 8, "shuffle": True, "seed": 3},
                   {"batch_size": 8, "shuffle": False, "mark_padding": True, "rank": 1, "world_size": 3}):
        host = TensorBatches(images, labels, indices, **kwargs)
        dev = DeviceBatches(cache, images, labels, indices, **kwargs)
        assert len(host) == len(dev)
        for epoch in (0, 4):  # the shuffle follows (seed, epoch) on both
            host.set_epoch(epoch)
            dev.set_epoch(epoch)
            for (xh, yh), (xd, yd) in _pairs(host, dev):
                assert torch.equal(xh, xd) and torch.equal(yh, yd)
                assert xd.shape[1] == channels and xd.dtype == torch.float32


def test_the_device_cache_is_chosen_by_the_setting_and_the_device():
    assert choose_device_cache("auto", 10, torch.device("cpu"))[0] is False  # auto: CUDA devices only
    keep, why = choose_device_cache(True, 10, torch.device("cpu"))
    assert keep and "data.device_cache=true" in why
    assert choose_device_cache(False, 10, torch.device("cpu"))[0] is False
    with pytest.raises(ConfigError, match="data.device_cache='gpu' is not one of auto, true, false"):
        choose_device_cache("gpu", 10, torch.device("cpu"))


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.precision=16-mixed", "trainer.precision=16-mixed needs a CUDA GPU.*use trainer.precision=bf16-mixed"),
    ("trainer.channels_last=yes", "trainer.channels_last must be true or false"),
    ("trainer.compile=1", "trainer.compile must be true or false"),
    ("data.device_cache=gpu", "data.device_cache='gpu' is not one of auto, true, false"),
    ("trainer.precision=fp8", "trainer.precision='fp8' is not one of"),
])
def test_bad_switches_are_refused_naming_the_key(cfg_factory, override, message):
    cfg = cfg_factory(["trainer.accelerator=cpu", override])
    with pytest.raises(ConfigError, match=message):
        prepare(cfg)


def test_16_mixed_on_the_cpu_exits_2_before_training(tmp_path, capsys):
    from pipeline.cli.apps import launch

    status = launch("train", ["trainer.precision=16-mixed", "trainer.accelerator=cpu", f"paths.root={tmp_path}",
                              f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "needs a CUDA GPU" in err and "bf16-mixed" in err
    assert not (tmp_path / "run").exists()  # nothing half-written


def _train(cfg_factory, *overrides, tracking=False):
    from pipeline.tasks.data import ensure_data
    from pipeline.tasks.train import train

    cfg = cfg_factory(["regularizer=[augment_cifar]", "trainer.limit_train_batches=4", "trainer.accelerator=cpu",
                       *overrides], epochs=1, tracking=tracking)
    ensure_data(cfg)
    return cfg, train(cfg, figures=False)


def test_the_device_cache_trains_exactly_as_host_batches(cfg_factory):
    """Augmented (flips and padded crops on the batch's device) and unaugmented alike."""
    _, host = _train(cfg_factory, "data.device_cache=false")
    _, cached = _train(cfg_factory, "data.device_cache=true")
    for key in ("train/loss", "train/acc", "val/acc"):
        assert cached[key] == host[key], key
    # The validation loss may differ in its last float32 bit: the cached images are slices of
    # one tensor, whose alignment can pick another vectorised summation path (seen on one
    # AMD EPYC host, with the code before and after 2026-12-02's changes alike).
    assert cached["val/loss"] == pytest.approx(host["val/loss"], rel=1e-6, abs=0)


def test_bf16_mixed_and_channels_last_train_on_the_cpu_together(cfg_factory):
    from pipeline.training.network import load_network

    cfg, metrics = _train(cfg_factory, "trainer.precision=bf16-mixed", "trainer.channels_last=true",
                          "data.device_cache=true")
    assert np.isfinite(metrics["train/loss"]) and metrics["val/acc"] > 0.1
    loaded = load_network(f"{cfg.paths.out_dir}/models/best.ckpt")
    assert all(p.dtype == torch.float32 for p in loaded.net.parameters())  # mixed: float32 weights
    conv = next(m for m in loaded.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # saved as trained


def test_compile_wraps_the_network_and_trains(cfg_factory):
    """`trainer.compile` through `speed_up`, traced by torch.compile for real; the "eager"
    backend skips Inductor's code generation (minutes of C++ compiling on this machine), the
    part only a benchmark needs. The state dict keeps its keys, so checkpoints do not change."""
    import lightning as L

    from pipeline.data.datamodule import ArrayDataModule
    from pipeline.training.builders import build_module, build_trainer, speed_up

    cfg = cfg_factory(["model=mlp", "trainer.compile=true", "trainer.channels_last=true",
                       "trainer.accelerator=cpu", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1"],
                      epochs=1, tracking=False)
    cfg = prepare(cfg)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, 64)
    dm = ArrayDataModule(images, labels, train_idx=np.arange(48), val_idx=np.arange(48, 64), batch_size=16,
                         eval_batch_size=16, seed=0, device_cache=True)
    module = build_module("mlp", {"in_channels": 1, "num_classes": 10, "image_size": 8}, mean=[0.5], std=[0.25],
                          resize=None, optimizer=cfg.optimizer, scheduler=cfg.scheduler,
                          regularizer=cfg.regularizer, init=cfg.init, seed=0)
    keys = list(module.state_dict())
    speed_up(module, cfg.trainer, compile_backend="eager")
    assert module.net._compiled_call_impl is not None and module.channels_last
    torch._dynamo.reset()
    with open_dict(cfg):
        cfg.trainer.max_epochs = 1
    trainer = build_trainer(cfg.trainer, [], root_dir=cfg.paths.out_dir, enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    assert isinstance(trainer, L.Trainer) and trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert list(module.state_dict()) == keys


NO_LIGHTNING = """
import sys
from omegaconf import OmegaConf
from pipeline.cli.main import main
from pipeline.tasks.evaluate import evaluate
from pipeline.tasks.report import report
from pipeline.validation import prepare

cfg = OmegaConf.load(sys.argv[1])
prepare(cfg.copy())
test = evaluate(cfg.copy())
page = report(cfg.copy())
main(["models", "--input", "1x8x8"])
print("RESULT", test["test/acc"], page.is_file(),
      sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")))
"""


def test_evaluate_report_models_and_validation_never_import_lightning(cfg_factory, tmp_path):
    """What does not train runs without Lightning's seconds of imports: the evaluate and report
    tasks read the checkpoint with plain torch (`load_network`), in a fresh interpreter; logging
    the model to MLflow (`mlflow.pytorch`) does not pull in `pytorch_lightning` either."""
    from omegaconf import OmegaConf

    from pipeline.tasks.evaluate import evaluate

    cfg, _ = _train(cfg_factory, "trainer.limit_val_batches=1", tracking=True)
    assert cfg.tracking.log_model
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    proc = subprocess.run([sys.executable, "-c", NO_LIGHTNING, str(tmp_path / "cfg.yaml")], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr
    assert "resnet20" in proc.stdout  # the model listing ran
    acc, page, loaded = proc.stdout.split("RESULT ")[1].split(" ", 2)
    assert page == "True" and loaded.strip() == "[]", proc.stdout
    # The same test accuracy as evaluating through the LightningModule's own loader would give.
    assert float(acc) == evaluate(cfg)["test/acc"]


NO_DYNAMO = """
import sys
from pipeline.config import load_params
from pipeline.validation import prepare
prepare(load_params(sys.argv[1]), trains=False)
print("DYNAMO", "torch._dynamo" in sys.modules)
"""


def test_a_stage_that_never_trains_checks_its_config_without_torch_dynamo(cfg_factory):
    """Validation for fetch, split, evaluate and report (`trains=False`) builds no optimizer
    (the first one a process builds imports `torch._dynamo`, about a CPU second) and probes
    the small default model on the CPU, not the meta device (whose first use imports it too);
    the settings themselves are still checked."""
    proc = subprocess.run([sys.executable, "-c", NO_DYNAMO, str(REPO / "params.yaml")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr
    assert "DYNAMO False" in proc.stdout, proc.stdout
    from pipeline.errors import ConfigError
    from pipeline.validation import prepare

    with pytest.raises(ConfigError, match="optimizer.lr"):
        prepare(cfg_factory(["optimizer.lr=-1"]), trains=False)
    with pytest.raises(ConfigError, match="scheduler.gamma"):
        prepare(cfg_factory(["scheduler.gamma=-0.5"]), trains=False)
    # What only the optimizer's own constructor refuses is caught where it trains.
    bad = ["optimizer=sgd", "+optimizer.nesterov=true"]
    prepare(cfg_factory(bad), trains=False)
    with pytest.raises(ConfigError, match="optimizer"):
        prepare(cfg_factory(bad))


DATA_STAGES = """
import sys
from pipeline.cli.stages import run_stage
codes = [run_stage(stage) for stage in ("fetch", "split")]
print("RESULT", codes, "torch" in sys.modules)
"""


def test_the_data_stages_run_without_importing_torch(cfg_factory, tmp_path):
    """fetch and split build no model: their config check (`models=False`) leaves the model,
    optimizer, schedule, regularizer and init settings to the stages that build one (those
    registries are torch modules, 1.8 s a stage here) and still checks every block's keys and
    the values the data stages read."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    (project / "dvc.yaml").write_text("stages: {}\n")
    proc = subprocess.run([sys.executable, "-c", DATA_STAGES], cwd=project, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr
    assert "RESULT [0, 0] False" in proc.stdout, proc.stdout + proc.stderr
    assert (project / "data/splits/digits/split.json").is_file()

    for bad, key in ((["+trainer.bogus=1"], "trainer.bogus"), (["data.split.folds=1"], "data.split.folds"),
                     (["cv.repeats=0"], "cv.repeats")):
        with pytest.raises(ConfigError, match=key):
            prepare(cfg_factory(bad), trains=False, models=False)
    left_to_training = ["model.dropout=7"]
    prepare(cfg_factory(left_to_training), trains=False, models=False)
    with pytest.raises(ConfigError, match="model.dropout"):
        prepare(cfg_factory(left_to_training), trains=False)


def test_a_cut_short_or_foreign_checkpoint_is_a_data_error(tmp_path):
    from pipeline.errors import DataError
    from pipeline.training.network import load_network

    torch.save({"weight": torch.zeros(2)}, tmp_path / "state.pt")
    with pytest.raises(DataError, match="state.pt is not a training checkpoint of this pipeline"):
        load_network(tmp_path / "state.pt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "state.pt").read_bytes()[:100])
    with pytest.raises(DataError, match="cut.ckpt is not a readable checkpoint .*truncated or corrupt"):
        load_network(tmp_path / "cut.ckpt")
