"""The train task's builders: each builds from the config sections it is given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from pipeline.config import to_container
from pipeline.tasks.train import configured_module
from pipeline.training.builders import build_datamodule, build_trainer, input_stats


def _datamodule(cfg):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, size=(20, 8, 8, cfg.data.channels), dtype=np.uint8)
    images[10:] = 255  # validation images unlike the training ones
    return build_datamodule(images, np.arange(20) % 2, cfg.data, train_idx=np.arange(10),
                            val_idx=np.arange(10, 20), seed=0), images


def test_input_stats_are_the_training_images_own(cfg_factory) -> None:
    cfg = cfg_factory()
    dm, images = _datamodule(cfg)
    assert (dm.batch_size, dm.eval_batch_size) == (cfg.data.batch_size, cfg.data.eval_batch_size)
    mean, std = input_stats(dm, cfg.data)
    assert mean == pytest.approx(images[:10].reshape(-1, cfg.data.channels).mean(0) / 255)
    with open_dict(cfg):
        cfg.data.normalize = False
    assert input_stats(dm, cfg.data) == ([0.0] * cfg.data.channels, [1.0] * cfg.data.channels)


def test_configured_module_is_the_config_s_model(cfg_factory) -> None:
    cfg = cfg_factory(["model=lenet5"])
    module = configured_module(cfg, _datamodule(cfg)[0], num_classes=3)
    assert module.hparams["arch"] == "lenet5" and module.hparams["arch_kwargs"]["num_classes"] == 3
    assert module.hparams["optimizer"] == to_container(cfg.optimizer)
    assert module.hparams["augment_seed"] == cfg.seed


def test_build_trainer_takes_its_section_and_overrides(cfg_factory, tmp_path: Path) -> None:
    cfg = cfg_factory()
    trainer = build_trainer(cfg.trainer, [], root_dir=tmp_path, max_steps=3, accelerator="cpu")
    assert trainer.max_epochs == cfg.trainer.max_epochs and trainer.max_steps == 3
    assert trainer.logger is None and trainer.num_sanity_val_steps == 0
    assert trainer.default_root_dir == str(tmp_path)
