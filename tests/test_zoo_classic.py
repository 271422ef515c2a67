"""AlexNet, VGG-11..19(_bn) and GoogLeNet: torchvision parity, small inputs, size limits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models import count_parameters, create_model, min_image_size
from pipeline.models.layers import ACTIVATIONS, Maxout

META = torch.device("meta")  # shapes only: the 140M-parameter VGGs cost nothing here
VGGS = [f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")]
NAMES = ["alexnet", "alexnet_small", *VGGS, "googlenet"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These nets run dozens of tiny convs; on a shared 2-core box two intra-op threads spend
    # most of the time waiting on each other (up to ~100x slower), so use one here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name, size, **kw):
    return create_model(name, in_channels=kw.pop("in_channels", 3), num_classes=5,
                        image_size=size, **kw)


def _signature(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


# --- parity with torchvision --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "reference"),
    [
        ("alexnet", {}, lambda: torchvision.models.alexnet()),
        *[(n, {}, lambda n=n: getattr(torchvision.models, n)()) for n in VGGS],
        ("googlenet", {"aux_logits": True},
         lambda: torchvision.models.googlenet(aux_logits=True, init_weights=False)),
        ("googlenet", {}, lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False)),
    ],
    ids=["alexnet", *VGGS, "googlenet-aux", "googlenet"],
)
def test_parameters_and_state_dict_match_torchvision(name, kwargs, reference):
    with META:
        ours = create_model(name, in_channels=3, num_classes=1000, image_size=224, **kwargs)
        theirs = reference()
    assert count_parameters(ours) == sum(p.numel() for p in theirs.parameters())
    # Same keys and shapes in the same order: torchvision checkpoints load unchanged.
    assert _signature(ours) == _signature(theirs)


# --- forward/backward on small inputs -----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        ("alexnet", {}, 63),
        ("alexnet", {"batch_norm": True, "pooling": "avg", "conv_dropout": 0.1}, (64, 80)),
        ("alexnet_small", {}, 8),
        ("alexnet_small", {"batch_norm": False, "pooling": "avg", "conv_dropout": 0.1}, 28),
        ("alexnet_small", {"in_channels": 1, "widths": [8, 8, 8, 8, 8], "fc_size": 16}, (9, 31)),
        ("vgg11", {"head": "small"}, 32),
        ("vgg13_bn", {"head": "small", "pooling": "avg", "conv_dropout": 0.1}, (32, 40)),
        ("googlenet", {}, 15),
        ("googlenet", {"stem": "small"}, 8),
        ("googlenet", {"stem": "small", "batch_norm": False, "pooling": "avg"}, 2),
        ("googlenet", {"stem": "small", "inception": "naive", "branch5x5_kernel": 5}, 4),
    ],
)
def test_forward_backward_small(name, kwargs, size):
    torch.manual_seed(0)
    in_channels = kwargs.get("in_channels", 3)
    model = _build(name, size, **dict(kwargs))
    h, w = (size, size) if isinstance(size, int) else size
    out = model(torch.randn(2, in_channels, h, w))
    assert out.shape == (2, 5)
    out.sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname


def test_vgg_small_head_is_gap_plus_one_linear():
    model = _build("vgg16", 32, head="small", dropout=0.0)
    assert [type(m) for m in model.classifier] == [nn.Dropout, nn.Linear]
    assert model.classifier[1].in_features == 512
    assert count_parameters(model) == count_parameters(model.features) + 512 * 5 + 5


# --- GoogLeNet specifics ------------------------------------------------------------------


def test_googlenet_aux_outputs_feed_the_loss_and_vanish_in_eval():
    torch.manual_seed(0)
    model = _build("googlenet", 8, stem="small", aux_logits=True)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 5)  # generic code works
    assert [a.shape for a in model.aux_outputs] == [(2, 5), (2, 5)]
    loss = F.cross_entropy(logits, y)
    loss = loss + 0.3 * sum(F.cross_entropy(a, y) for a in model.aux_outputs)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # aux heads trained too
    copy.deepcopy(model)  # stored non-leaf aux logits must not break EMA/SWA-style copies
    model.eval()
    model(x)
    assert model.aux_outputs == ()
    plain = _build("googlenet", 8, stem="small")
    plain(x)
    assert plain.aux1 is None and plain.aux_outputs == ()
    assert count_parameters(model) > count_parameters(plain)


def test_naive_inception_has_no_reductions_and_many_more_parameters():
    with META:
        reduced = create_model("googlenet", in_channels=3, num_classes=1000, image_size=224)
        naive = create_model("googlenet", in_channels=3, num_classes=1000, image_size=224,
                             inception="naive", branch5x5_kernel=5)
    # Inception 3a, Fig. 2a: 1x1/3x3/5x5 convs on all 192 input maps (no conv bias: BN
    # follows, with 2 parameters per channel); the pool branch has no weights.
    block = naive.inception3a
    expected = 192 * 64 + 192 * 128 * 9 + 192 * 32 * 25 + 2 * (64 + 128 + 32)
    assert count_parameters(block) == expected
    assert block.out_channels == 64 + 128 + 32 + 192  # the pool passes its input through
    assert count_parameters(naive) > 10 * count_parameters(reduced)


def test_googlenet_without_batch_norm_has_biased_convs():
    model = _build("googlenet", 15, batch_norm=False)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is not None for c in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs",
    [{"stem": "tiny"}, {"inception": "v3"}, {"branch5x5_kernel": 4}, {"aux_dropout": 1.0}],
)
def test_googlenet_bad_options_raise(kwargs):
    with pytest.raises(ConfigError):
        _build("googlenet", 32, **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("vgg11", {"head": "tiny"}), ("alexnet_small", {"widths": [8, 8]}),
     ("alexnet", {"conv_dropout": 1.5})],
)
def test_family_bad_options_raise(name, kwargs):
    with pytest.raises(ConfigError):
        _build(name, 64, **kwargs)


# --- minimum sizes ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_below_min_size_raises_naming_model_and_size(name):
    low = min_image_size(name)
    with pytest.raises(ConfigError, match=rf"{name}.*>= {low}\b"):
        _build(name, low - 1)
    with pytest.raises(ConfigError, match=name):
        _build(name, (low + 40, low - 1))  # the smaller side decides
    with META:
        model = _build(name, low).eval()
        assert model(torch.zeros(1, 3, low, low, device=META)).shape == (1, 5)


@pytest.mark.parametrize(
    ("builder", "size"),
    [(torchvision.models.alexnet, 63), (torchvision.models.vgg11, 32),
     (lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False), 15)],
)
def test_declared_min_sizes_are_where_torchvision_stops(builder, size):
    # Honest minimums: the reference runs at our declared size and fails one pixel below.
    with META:
        model = builder().eval()
        model(torch.zeros(1, 3, size, size, device=META))
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, size - 1, size - 1, device=META))


def test_googlenet_small_stem_minimum():
    _build("googlenet", 2, stem="small")
    with pytest.raises(ConfigError, match=r"googlenet.*>= 2\b"):
        _build("googlenet", 1, stem="small")


# --- every activation in every family ----------------------------------------------------

ACTIVATION_SPECS = [*sorted(ACTIVATIONS), {"name": "maxout", "pieces": 2}]
SMALLEST = [
    ("alexnet_small", {}, 8),
    ("vgg11_bn", {"head": "small"}, 32),
    ("googlenet", {"stem": "small"}, 4),
]


@pytest.mark.parametrize("activation", ACTIVATION_SPECS, ids=lambda a: a if isinstance(a, str) else "maxout")
@pytest.mark.parametrize(("name", "kwargs", "size"), SMALLEST, ids=[s[0] for s in SMALLEST])
def test_every_activation_runs(name, kwargs, size, activation):
    model = _build(name, size, activation=activation, **kwargs)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 5)
    if activation != "relu":  # honored everywhere: no ReLU left anywhere
        assert not any(isinstance(m, nn.ReLU) for m in model.modules())


@pytest.mark.parametrize("name", ["alexnet", "vgg11", "googlenet"])
def test_maxout_in_the_imagenet_heads(name):
    # The 4096-unit FC layers (and GoogLeNet's aux FC) take maxout with dim=1.
    kwargs = {"aux_logits": True} if name == "googlenet" else {}
    with META:
        model = create_model(name, in_channels=3, num_classes=7, image_size=224,
                             activation={"name": "maxout", "pieces": 2}, **kwargs)
        assert any(isinstance(m, Maxout) and m.dim == 1 for m in model.modules())
        assert model(torch.zeros(2, 3, 224, 224, device=META)).shape == (2, 7)
