"""Model registry, layer tables, complexity counters and every registered architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models import (
    count_macs,
    count_parameters,
    create_model,
    list_models,
    min_image_size,
    model_defaults,
    register_model,
)
from pipeline.models.layers import ACTIVATIONS, POOLS, make_activation, make_norm, make_pool
from pipeline.validation import INPUT_SIZE

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]


# --- registry ---------------------------------------------------------------------------


def test_list_models_contains_first_three_sorted():
    names = list_models()
    assert {"mlp", "lenet5", "minivgg"} <= set(names)
    assert names == sorted(names)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="mlp"):
        register_model("mlp")(lambda **kw: nn.Identity())


def test_unknown_model_lists_choices():
    with pytest.raises(ConfigError, match="resnet999") as exc:
        create_model("resnet999", in_channels=1, num_classes=2, image_size=28)
    assert "lenet5" in str(exc.value) and "minivgg" in str(exc.value)


def test_unknown_kwarg_names_key_and_accepted_keys():
    with pytest.raises(ConfigError, match="hiden_sizes") as exc:
        create_model("mlp", in_channels=1, num_classes=2, image_size=8, hiden_sizes=[4])
    assert "hidden_sizes" in str(exc.value)


def test_none_kwargs_are_dropped_and_arch_recorded():
    model = create_model("mlp", in_channels=1, num_classes=3, image_size=8, dropout=None)
    assert model.arch == "mlp"
    assert model.arch_kwargs["dropout"] == 0.0
    assert model.arch_kwargs["hidden_sizes"] == [256, 128]


def test_arch_kwargs_rebuild_same_architecture():
    model = create_model("minivgg", in_channels=3, num_classes=4, image_size=(16, 12), widths=(8,))
    clone = create_model(model.arch, **model.arch_kwargs)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in clone.state_dict().items()}


@pytest.mark.parametrize(
    "kwargs",
    [{"in_channels": 0}, {"num_classes": -1}, {"image_size": 0}, {"image_size": [8, 8, 8]}],
)
def test_bad_common_arguments_raise_config_error(kwargs):
    args = {"in_channels": 1, "num_classes": 2, "image_size": 8, **kwargs}
    with pytest.raises(ConfigError):
        create_model("mlp", **args)


# --- every registered model -------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name, shape):
    torch.manual_seed(0)
    if shape[1] < min_image_size(name):
        # Designs that cannot take this input must say so clearly, before any forward pass.
        with pytest.raises(ConfigError, match=name):
            create_model(name, in_channels=shape[0], num_classes=5, image_size=shape[1])
        return
    model = create_model(name, in_channels=shape[0], num_classes=5, image_size=shape[1])
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 5)
    out.sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_model_config_builds_and_matches_defaults(path):
    cfg = OmegaConf.load(path)
    name = cfg.pop("name")
    # The design's intended input (LeNet-5's 32 px) sizes the data, not the builder.
    input_size = cfg.pop(INPUT_SIZE, None)
    assert input_size is None or (isinstance(input_size, int) and input_size >= min_image_size(name))
    assert {"activation", "dropout", "batch_norm"} <= set(cfg)
    assert OmegaConf.to_container(cfg) == model_defaults(name)  # yaml stays in sync with code
    size = max(32, min_image_size(name))
    model = create_model(name, in_channels=3, num_classes=10, image_size=size, **cfg)
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 10)


def test_model_configs_exist_for_first_three():
    assert {"mlp", "lenet5", "minivgg"} <= {p.stem for p in CONF_DIR.glob("*.yaml")}


# --- lenet5 / minivgg specifics ---------------------------------------------------------


def test_lenet5_classic_parameter_count():
    model = create_model("lenet5", in_channels=1, num_classes=10, image_size=32)
    assert count_parameters(model) == 61_706
    assert model.c1.padding == (0, 0) and model.c3.padding == (0, 0)


@pytest.mark.parametrize(
    ("size", "c1_pad", "c3_pad", "c5_in"),
    [(28, 2, 0, 16 * 5 * 5), (8, 2, 2, 16 * 2 * 2), (64, 0, 0, 16 * 13 * 13)],
)
def test_lenet5_padding_adapts_to_size(size, c1_pad, c3_pad, c5_in):
    model = create_model("lenet5", in_channels=1, num_classes=10, image_size=size)
    assert model.c1.padding == (c1_pad, c1_pad)
    assert model.c3.padding == (c3_pad, c3_pad)
    assert model.c5.in_features == c5_in


@pytest.mark.parametrize("size", list(range(8, 34)) + [(9, 31)])
def test_lenet5_runs_at_every_small_size(size):
    model = create_model("lenet5", in_channels=2, num_classes=3, image_size=size).eval()
    h, w = (size, size) if isinstance(size, int) else size
    assert model(torch.zeros(1, 2, h, w)).shape == (1, 3)


def test_lenet5_too_small_raises():
    with pytest.raises(ConfigError, match="image_size >= 8"):
        create_model("lenet5", in_channels=1, num_classes=10, image_size=7)


def test_minivgg_too_small_raises():
    with pytest.raises(ConfigError, match="image_size >= 4"):
        create_model("minivgg", in_channels=3, num_classes=10, image_size=2)


def test_regularizer_knobs_change_the_model():
    plain = create_model("lenet5", in_channels=1, num_classes=10, image_size=28)
    bn = create_model(
        "lenet5", in_channels=1, num_classes=10, image_size=28, batch_norm=True, activation="relu"
    )
    assert count_parameters(bn) == count_parameters(plain) + 2 * (6 + 16)
    assert isinstance(bn.c1_act, nn.ReLU)
    with pytest.raises(ConfigError, match="dropout"):
        create_model("mlp", in_channels=1, num_classes=2, image_size=8, dropout=1.5)


# --- complexity -------------------------------------------------------------------------


def test_count_macs_lenet5_by_hand():
    model = create_model("lenet5", in_channels=1, num_classes=10, image_size=32)
    expected = (
        6 * 28 * 28 * 25 * 1  # C1
        + 16 * 10 * 10 * 25 * 6  # C3
        + 120 * 400  # C5
        + 84 * 120  # F6
        + 10 * 84  # output
    )
    assert count_macs(model, (1, 32, 32)) == expected


def test_count_macs_mlp_by_hand_and_restores_state():
    model = create_model(
        "mlp", in_channels=1, num_classes=5, image_size=28, batch_norm=True, dropout=0.1
    )
    model.train()
    model[1].eval()  # a mixed-mode model must come back mixed
    assert count_macs(model, (1, 28, 28)) == 784 * 256 + 256 * 128 + 128 * 5
    assert model.training and not model[1].training and model[2].training
    assert not any(m._forward_hooks for m in model.modules())


def test_count_macs_grouped_conv_and_leading_dims():
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
    assert count_macs(conv, (4, 6, 6)) == 8 * 6 * 6 * (4 // 2) * 9
    linear = nn.Linear(6, 3)  # applied to (1, 2, 4, 6): 2 * 4 leading positions
    assert count_macs(linear, (2, 4, 6)) == 2 * 4 * 6 * 3


def test_count_parameters_trainable_only():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    assert count_parameters(model) == 8 + 3
    assert count_parameters(model, trainable_only=True) == 3


# --- layer tables -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_builds(name):
    assert make_activation(name)(torch.linspace(-2, 2, 5)).shape == (5,)


def test_activation_options_and_errors():
    assert make_activation("leaky_relu", negative_slope=0.2).negative_slope == 0.2
    assert make_activation("elu", alpha=0.5).alpha == 0.5
    with pytest.raises(ConfigError, match="swishy") as exc:
        make_activation("swishy")
    assert "relu" in str(exc.value)
    with pytest.raises(ConfigError, match="activation"):
        create_model("mlp", in_channels=1, num_classes=2, image_size=8, activation="swishy")
    with pytest.raises(ConfigError):
        make_activation("relu", negative_slope=0.1)


@pytest.mark.parametrize("name", sorted(POOLS))
def test_every_pool_builds(name):
    assert make_pool(name)(torch.zeros(1, 1, 4, 4)).shape == (1, 1, 2, 2)
    same = make_pool(name, kernel_size=3, stride=1, padding=1)
    assert same(torch.zeros(1, 1, 4, 4)).shape == (1, 1, 4, 4)


def test_bad_pool_raises():
    with pytest.raises(ConfigError, match="max"):
        make_pool("median")


@pytest.mark.parametrize(
    ("spec", "dim", "kind"),
    [
        ("batch", 2, nn.BatchNorm2d),
        (True, 2, nn.BatchNorm2d),
        (True, 1, nn.BatchNorm1d),
        (None, 2, nn.Identity),
        (False, 1, nn.Identity),
        ("none", 2, nn.Identity),
    ],
)
def test_make_norm(spec, dim, kind):
    assert isinstance(make_norm(spec, 4, dim=dim), kind)


def test_bad_norm_raises():
    with pytest.raises(ConfigError, match="batch"):
        make_norm("layer", 4)
