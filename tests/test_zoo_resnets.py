"""ResNet / ResNeXt / DenseNet zoo: exact torchvision and paper parameter counts, options.

Big models are built on the meta device, so counting their parameters costs no memory or time.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models import count_parameters, create_model, min_image_size
from pipeline.models.resnet import Unit, ZeroPadShortcut, resnet_cifar

IMAGENET = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "densenet121", "densenet169", "densenet201",
]
CIFAR = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
         "resnext", "resnext29_8x64d", "resnext29_16x64d", "densenet_bc"]


def meta_params(name: str, num_classes: int = 10, image_size: int = 32, **kw) -> int:
    with torch.device("meta"):
        model = create_model(name, in_channels=3, num_classes=num_classes,
                             image_size=image_size, **kw)
    return count_parameters(model)


def leaves(module: nn.Module) -> list[nn.Module]:
    skip = (nn.Sequential, nn.Identity, Unit)
    return [m for m in module.modules() if not isinstance(m, skip)]


def small(name: str, size: int = 8, **kw) -> nn.Module:
    return create_model(name, in_channels=3, num_classes=4, image_size=size, **kw)


def assert_trains(model: nn.Module, shape: tuple[int, int, int]) -> None:
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, model.fc.out_features)
    out.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


# --- parameter counts -------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_presets_match_torchvision_exactly(name):
    with torch.device("meta"):
        reference = getattr(torchvision.models, name)(weights=None)
    assert meta_params(name, 1000, 224) == count_parameters(reference)


@pytest.mark.parametrize(
    ("name", "millions", "digits"),
    [("resnet20", 0.27, 2), ("resnet32", 0.46, 2), ("resnet44", 0.66, 2), ("resnet56", 0.85, 2),
     ("resnet110", 1.7, 1)],
)
def test_cifar_resnets_match_paper(name, millions, digits):
    # He et al. 2015, Table 6 (option A shortcuts, CIFAR-10).
    assert round(meta_params(name) / 1e6, digits) == millions


@pytest.mark.parametrize(("name", "millions"), [("resnext29_8x64d", 34.4),
                                                ("resnext29_16x64d", 68.1)])
def test_cifar_resnexts_match_paper(name, millions):
    # Xie et al. 2017, Table 7 (CIFAR-10).
    assert meta_params(name) / 1e6 == pytest.approx(millions, rel=0.01)


@pytest.mark.parametrize(("depth", "k", "millions"), [(100, 12, 0.8), (250, 24, 15.3),
                                                      (190, 40, 25.6)])
def test_densenet_bc_matches_paper(depth, k, millions):
    # Huang et al. 2017, Table 2. BC-100 is 769,162 exactly (as in the authors' code), which
    # the paper rounds to 0.8M; so compare at the table's precision.
    n = meta_params("densenet_bc", depth=depth, growth_rate=k)
    assert round(n / 1e6, 1) == millions


def test_generic_resnext_spans_both_layouts():
    fifty = meta_params("resnext", 1000, 224, cardinality=32, base_width=4,
                        layers=[3, 4, 6, 3], stem="imagenet")
    assert fifty == meta_params("resnext50_32x4d", 1000, 224)
    assert meta_params("resnext", cardinality=8, base_width=64) == meta_params("resnext29_8x64d")
    assert meta_params("resnext") < 4e6  # the default stays CPU-sized


# --- options ----------------------------------------------------------------------------


def test_shortcut_a_is_parameter_free_and_b_projects():
    a, b = small("resnet20"), small("resnet20", shortcut="B")
    assert sum(isinstance(m, ZeroPadShortcut) for m in a.modules()) == 2  # one per new stage
    projections = [u.shortcut for u in b.modules() if isinstance(u, Unit) and u.reshape]
    assert len(projections) == 2 and all(isinstance(s[0], nn.Conv2d) for s in projections)
    # 16->32 and 32->64 1x1 convs plus their BN (weight and bias).
    assert count_parameters(b) - count_parameters(a) == 16 * 32 + 32 * 64 + 2 * (32 + 64)


@pytest.mark.parametrize("size", [(9, 13), (4, 5)])
def test_shortcut_a_handles_odd_sizes(size):
    assert_trains(create_model("resnet20", in_channels=1, num_classes=3, image_size=size),
                  (1, *size))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20", "resnext", "resnext50_32x4d"])
def test_preact_reorders_every_unit(name):
    with torch.device("meta"):
        post, pre = small(name, 32), small(name, 32, preact=True)
    for model, first in ((post, nn.Conv2d), (pre, nn.BatchNorm2d)):
        units = [m for m in model.modules() if isinstance(m, Unit)]
        assert units and all(isinstance(leaves(u)[0], first) for u in units)
    assert isinstance(post.final, nn.Identity)
    assert [type(m) for m in pre.final] == [nn.BatchNorm2d, nn.ReLU]  # before the pool


@pytest.mark.parametrize(("name", "kw"), [("resnet20", {"shortcut": "B"}),
                                          ("resnext", {"layers": [1, 2]})])
def test_preact_trains(name, kw):
    assert_trains(small(name, preact=True, **kw), (3, 8, 8))


def test_preact_cifar_stem_is_a_bare_conv():
    assert [type(m) for m in small("resnet20", preact=True).stem] == [nn.Conv2d]
    assert len(small("resnet20").stem) == 3


def test_cifar_stem_runs_imagenet_layout_on_small_images():
    model = create_model("resnet18", in_channels=3, num_classes=4, image_size=8, stem="cifar",
                         preact=True)
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert_trains(model, (3, 8, 8))


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_activation_honoured_everywhere(name):
    with torch.device("meta"):
        model = create_model(name, in_channels=3, num_classes=4, image_size=32,
                             activation={"name": "leaky_relu", "negative_slope": 0.2})
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert acts and all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in acts)


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_maxout_gets_channel_counts(name):
    # Maxout raises without a channel count, so building proves every activation got one.
    with torch.device("meta"):
        model = create_model(name, in_channels=3, num_classes=4, image_size=32,
                             activation="maxout")
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_maxout_trains():
    assert_trains(small("resnet20", activation="maxout"), (3, 8, 8))


@pytest.mark.parametrize(("name", "size"), [("resnet18", 32), ("resnext", 8), ("densenet_bc", 8)])
def test_batch_norm_off_and_dropouts(name, size):
    kw = {"densenet_bc": {"depth": 22}, "resnext": {"layers": [1, 1]}}.get(name, {})
    model = small(name, size, batch_norm=False, dropout=0.3, conv_dropout=0.1, **kw)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model.dropout.p == 0.3
    assert any(isinstance(m, nn.Dropout2d) and m.p == 0.1 for m in model.modules())
    assert_trains(model, (3, size, size))


def test_densenet_bc_small_trains_and_rebuilds():
    model = small("densenet_bc", 8, depth=22, growth_rate=4, compression=1.0)
    assert_trains(model, (3, 8, 8))
    clone = create_model(model.arch, **model.arch_kwargs)
    assert count_parameters(clone) == count_parameters(model)


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_below_min_size_names_model_and_minimum(name):
    least = min_image_size(name)
    with pytest.raises(ConfigError, match=rf"{name} needs image_size >= {least}"):
        create_model(name, in_channels=3, num_classes=2, image_size=least - 1)


def test_min_size_follows_the_stem():
    with pytest.raises(ConfigError, match="resnet18 needs image_size >= 8"):
        create_model("resnet18", in_channels=3, num_classes=2, image_size=7, stem="cifar")
    with pytest.raises(ConfigError, match="resnext needs image_size >= 32"):
        create_model("resnext", in_channels=3, num_classes=2, image_size=16, stem="imagenet",
                     layers=[1, 1, 1, 1])


@pytest.mark.parametrize("depth", [101, 4, 98, "100", True])
def test_densenet_bc_bad_depth(depth):
    with pytest.raises(ConfigError, match=r"6n \+ 4"):
        create_model("densenet_bc", in_channels=3, num_classes=2, image_size=32, depth=depth)


def test_cifar_resnet_bad_depth():
    with pytest.raises(ConfigError, match=r"6n \+ 2"):
        resnet_cifar("resnet21", depth=21, in_channels=3, num_classes=2, image_size=32)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [("resnet20", {"shortcut": "C"}, "shortcut"), ("resnet18", {"stem": "tiny"}, "stem"),
     ("resnet20", {"preact": "yes"}, "preact"), ("resnext", {"cardinality": 0}, "cardinality"),
     ("resnext", {"layers": []}, None), ("densenet_bc", {"compression": 1.5}, "compression"),
     ("resnet20", {"conv_dropout": 1.0}, "conv_dropout"), ("resnet20", {"activation": "x"}, "x")],
)
def test_bad_options_raise_config_error(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        small(name, 32, **kwargs)
