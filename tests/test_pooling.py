"""Configurable pooling: ``model.pooling`` as a name or a ``{name, kernel_size, stride,
padding}`` mapping, in every model with pooling layers of its own."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torchvision
from torch import nn

from pipeline.config import compose
from pipeline.errors import ConfigError
from pipeline.models import create_model, layers
from pipeline.models.layers import make_pool, pool_output_size
from pipeline.validation import model_args

POOL_TYPES = (nn.MaxPool2d, nn.AvgPool2d)
SPEC = {"name": "avg", "kernel_size": 3, "stride": 2, "padding": 1}


def _build(name, size, **kw):
    return create_model(name, in_channels=3, num_classes=5, image_size=size, **kw)


def _signature(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _pools(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, POOL_TYPES)]


def _googlenet_stage_pools(model: nn.Module) -> list[nn.Module]:
    # The inception branch pools stay 3x3/1 (their output is concatenated); only the type follows.
    return [model.maxpool1, model.maxpool2, model.maxpool3, model.maxpool4]


# (name, extra kwargs, size, which pools the spec reshapes)
CASES = [
    ("lenet5", {}, 32, _pools),
    ("minivgg", {"widths": [8, 16], "fc_size": 16}, 32, _pools),
    ("vgg11", {"head": "small"}, 32, _pools),
    ("alexnet", {}, 64, _pools),
    ("alexnet_small", {"widths": [8, 8, 8, 8, 8], "fc_size": 16}, 32, _pools),
    ("googlenet", {}, 32, _googlenet_stage_pools),
    ("resnet18", {}, 32, _pools),
    ("resnext", {"stem": "imagenet", "layers": [1, 1, 1, 1], "cardinality": 2, "base_width": 4},
     32, _pools),
    ("densenet121", {"stem_pooling": SPEC}, 32, _pools),
    ("densenet_bc", {"depth": 22, "growth_rate": 4}, 32, _pools),
]


@pytest.mark.parametrize(("name", "kwargs", "size", "select"), CASES, ids=[c[0] for c in CASES])
def test_pooling_mapping_reshapes_the_pools_and_trains(name, kwargs, size, select):
    torch.manual_seed(0)
    model = _build(name, size, pooling=SPEC, **kwargs)
    pools = select(model)
    assert pools and all(isinstance(p, nn.AvgPool2d) for p in pools)
    assert all((p.kernel_size, p.stride, p.padding) == (3, 2, 1) for p in pools)
    if name != "googlenet":  # every pool of the design follows the spec
        assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 5)
    out.sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
    clone = create_model(model.arch, **model.arch_kwargs)  # checkpoints rebuild it
    assert _signature(clone) == _signature(model)


@pytest.mark.parametrize(("name", "kwargs", "size", "select"), CASES, ids=[c[0] for c in CASES])
def test_name_only_mapping_is_the_design(name, kwargs, size, select):
    # {name: max} keeps every design kernel/stride/padding, i.e. equals plain "max".
    kwargs = {k: v for k, v in kwargs.items() if k != "stem_pooling"}
    default = "avg" if name in ("lenet5", "densenet121", "densenet_bc") else "max"
    with torch.device("meta"):
        plain = _build(name, size, pooling=default, **kwargs)
        mapped = _build(name, size, pooling={"name": default}, **kwargs)
    assert _signature(plain) == _signature(mapped)
    assert str(plain) == str(mapped)


@pytest.mark.parametrize(
    ("name", "reference", "kwargs"),
    [
        ("alexnet", torchvision.models.alexnet, {}),
        ("vgg16_bn", torchvision.models.vgg16_bn, {}),
        ("googlenet", lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False),
         {}),
        ("resnet18", torchvision.models.resnet18, {}),
        ("resnext50_32x4d", torchvision.models.resnext50_32x4d, {}),
        ("densenet121", torchvision.models.densenet121, {}),
    ],
)
def test_default_pools_have_torchvisions_geometry(name, reference, kwargs):
    # "pooling: max" (the default) must still be exactly the reference architecture.
    with torch.device("meta"):
        ours = create_model(name, in_channels=3, num_classes=1000, image_size=224, **kwargs)
        theirs = reference()
    assert Counter(map(str, _pools(ours))) == Counter(map(str, _pools(theirs)))
    # ResNets/DenseNets name their keys differently; the tensors themselves are the same.
    assert Counter(s for _, s in _signature(ours)) == Counter(s for _, s in _signature(theirs))


def test_lenet5_classic_pools_and_paddings_unchanged():
    model = _build("lenet5", 32)
    assert [str(p) for p in _pools(model)] == ["AvgPool2d(kernel_size=2, stride=2, padding=0)"] * 2
    assert model.c5.in_features == 16 * 5 * 5


def test_flattened_sizes_follow_the_pool():
    # 3x3/2 pad 1 on 32 px: C1 28 → S2 14 → C3 10 → S4 5, as with 2x2/2.
    assert _build("lenet5", 32, pooling=SPEC).c5.in_features == 16 * 5 * 5
    # Stride-1 "same" pools keep the map: 32 → 32 → 32 with two widths.
    same = {"name": "max", "kernel_size": 3, "stride": 1, "padding": 1}
    model = _build("minivgg", 32, widths=[4, 8], fc_size=8, pooling=same)
    assert model.classifier[0].in_features == 8 * 32 * 32
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    # A kernel-only override keeps lenet's design stride 2: 28 → S2 (28-3)//2+1 = 13.
    model = _build("lenet5", (28, 36), pooling={"name": "max", "kernel_size": 3})
    assert model.eval()(torch.zeros(1, 3, 28, 36)).shape == (1, 5)


@pytest.mark.parametrize(
    ("name", "size", "spec", "kwargs"),
    [
        ("lenet5", 8, {"name": "max", "kernel_size": 4, "stride": 4}, {}),
        ("minivgg", 8, {"name": "max", "kernel_size": 4, "stride": 4}, {}),
        ("vgg11", 32, {"name": "max", "kernel_size": 3, "stride": 2}, {"head": "small"}),
        ("alexnet", 63, {"name": "max", "kernel_size": 4, "stride": 4}, {}),
        ("alexnet_small", 8, {"name": "max", "kernel_size": 3, "stride": 2, "padding": 0}, {}),
        ("googlenet", 15, {"name": "max", "kernel_size": 3, "stride": 3, "ceil_mode": False}, {}),
        ("resnet18", 32, {"name": "max", "kernel_size": 20, "padding": 0}, {}),
        ("densenet_bc", 8, {"name": "avg", "kernel_size": 3, "stride": 3}, {"depth": 22}),
        ("densenet121", 32, "avg", {"stem_pooling": {"name": "max", "kernel_size": 8, "stride": 8}}),
    ],
)
def test_pooling_that_collapses_the_map_raises(name, size, spec, kwargs):
    with pytest.raises(ConfigError, match=rf"{name}.*{size}x{size}.*larger image_size") as exc:
        _build(name, size, pooling=spec, **kwargs)
    assert "pooling" in str(exc.value)


@pytest.mark.parametrize(("name", "kwargs", "size", "collapse"), [
    ("lenet5", {}, 32, {"name": "max", "kernel_size": 8, "stride": 8}),
    ("minivgg", {"widths": [8, 16], "fc_size": 16}, 8, {"name": "max", "kernel_size": 4, "stride": 4}),
    ("resnet18", {}, 32, {"name": "max", "kernel_size": 20, "padding": 0}),
])
def test_the_probe_answers_alike_for_real_and_on_the_meta_device(monkeypatch, name, kwargs, size, collapse):
    """Small models are probed with a real forward pass (the meta device's first use costs a
    process about a second), large ones on the meta device: the same shapes and errors."""
    shapes, errors = [], []
    for bound in (float("inf"), 0):  # every model for real, then every model on meta
        monkeypatch.setattr(layers, "CPU_PROBE_MACS", bound)
        model = _build(name, size, **kwargs)
        features = nn.Sequential(*list(model.children())[:-1])  # up to the classifier head
        shapes.append(layers.probe(features, 3, size, name))
        with pytest.raises(ConfigError, match=rf"{name}.*{size}x{size}") as exc:
            _build(name, size, pooling=collapse, **kwargs)
        errors.append(str(exc.value))
    assert shapes[0] == shapes[1]
    assert errors[0].split(" (")[0] == errors[1].split(" (")[0]


def test_collapse_is_caught_on_the_meta_device_too():
    with torch.device("meta"), pytest.raises(ConfigError, match="lenet5"):
        _build("lenet5", 8, pooling={"name": "max", "kernel_size": 4, "stride": 4})


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "max", "kernal_size": 3}, "unknown option 'kernal_size'"),
        ({"name": "max", "kernel_size": 0}, "kernel_size"),
        ({"name": "max", "kernel_size": True}, "kernel_size"),
        ({"name": "max", "kernel_size": [3]}, "kernel_size"),
        ({"name": "max", "stride": -1}, "stride"),
        ({"name": "max", "padding": 2}, "padding"),  # more than half the 2x2 window
        ({"name": "max", "ceil_mode": "yes"}, "ceil_mode"),
        ({"kernel_size": 3}, "needs a name"),
        ({"name": "median"}, "median"),
        ("median", "max"),
        (3, "max"),
    ],
)
def test_bad_pooling_specs_raise_naming_the_key(spec, match):
    with pytest.raises(ConfigError, match=match) as exc:
        make_pool(spec)
    assert "model.pooling" in str(exc.value)
    with pytest.raises(ConfigError, match="model.pooling"):
        _build("lenet5", 32, pooling=spec)


def test_bad_specs_raise_even_where_no_pool_is_built():
    with pytest.raises(ConfigError, match="model.pooling"):
        _build("resnet18", 32, stem="cifar", pooling={"name": "max", "size": 3})
    with pytest.raises(ConfigError, match="model.stem_pooling"):
        _build("densenet121", 32, stem_pooling="median")


def test_make_pool_spec_overrides_design_values():
    pool = make_pool({"name": "MAX", "kernel_size": [3, 2], "ceil_mode": True}, 2, 1, 1)
    assert isinstance(pool, nn.MaxPool2d)
    assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == ((3, 2), 1, 1, True)
    assert make_pool({"name": "avg", "stride": None}, 4, 2).stride == 4  # null: kernel_size
    assert make_pool("avg", 3, 2).kernel_size == 3  # a string keeps the design's geometry


@pytest.mark.parametrize("spec", [
    {"name": "max", "kernel_size": 3, "stride": 2, "padding": 1},
    {"name": "avg", "kernel_size": 2, "stride": 2, "ceil_mode": True},
    {"name": "max", "kernel_size": 3, "stride": 3, "padding": 1, "ceil_mode": True},
    {"name": "avg", "kernel_size": 4, "stride": 1},
    {"name": "max", "kernel_size": 3, "stride": 3, "ceil_mode": True},  # overhanging windows
    {"name": "avg", "kernel_size": 5, "stride": 2, "padding": 2, "ceil_mode": True},
])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_pool_output_size_matches_torch(spec, size):
    pool = make_pool(spec)
    expected = pool_output_size(size, pool)
    x = torch.zeros(1, 1, size, size)
    if expected == 0:
        with pytest.raises(RuntimeError):
            pool(x)
    else:
        assert pool(x).shape[-1] == expected


def test_hydra_override_reaches_the_model():
    cfg = compose(["model=lenet5", "model.pooling={name:max,kernel_size:3,stride:2,padding:1}"])
    model = create_model(**model_args(cfg, num_classes=3))
    assert (model.s2.kernel_size, model.s2.stride, model.s2.padding) == (3, 2, 1)
