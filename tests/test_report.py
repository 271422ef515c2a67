"""The "what the network learned" report: the inspection maths on hand-built models, then
the whole report from a real train + evaluate, in MLflow and in a real browser."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf
from torch import nn

from conftest import REPO, make_cfg
from pipeline.models import count_macs, count_parameters, create_model, list_models, min_image_size
from pipeline.reports import introspect, projection, receptive
from pipeline.reports.page import FILES, SECTIONS, diagnose, write_report
from pipeline.reports.receptive import Axis
from pipeline.training.metrics import file_row

IMG = re.compile(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


# ------------------------------------------------------------------ saliency and Grad-CAM

@pytest.mark.parametrize("channels", [1, 3])
def test_saliency_of_a_linear_model_is_the_abs_weights_of_the_target_class(channels: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(channels * 5 * 6, 4))
    x, target = torch.rand(3, channels, 5, 6), torch.tensor([0, 2, 3])
    sal = introspect.saliency(model, x, target)
    w = model[1].weight.detach().view(4, channels, 5, 6).abs().amax(dim=1)
    assert sal.shape == (3, 5, 6)
    torch.testing.assert_close(sal, w[target], rtol=0, atol=0)
    assert model[1].weight.grad is None  # parameter gradients untouched


def test_saliency_box_by_hand() -> None:
    maps = np.zeros((4, 6, 8))
    maps[0, 0:2, 0:2] = 1.0                                  # 4 strong pixels ...
    for r, c in ((3, 3), (4, 4), (5, 5), (4, 6), (3, 7)):    # ... lose to 5 weak ones joined diagonally
        maps[0, r, c] = 0.5
    maps[1, 0, 4:6] = maps[1, 2:4, 0] = 1.0                  # two of 2 pixels: the first in raster order
    maps[3] = np.arange(48).reshape(6, 8)                    # 95th percentile 44.65: pixels 45, 46, 47
    boxes = introspect.saliency_box(maps, percentile=50)
    assert boxes.shape == (4, 4) and boxes.dtype == np.int64
    assert boxes[:3].tolist() == [[3, 3, 5, 7], [0, 4, 0, 5], [0, 0, 5, 7]]  # constant map: the whole image
    assert introspect.saliency_box(maps[3:], 95).tolist() == [[5, 5, 5, 7]]
    # Deterministic, and the same from a tensor.
    assert np.array_equal(introspect.saliency_box(torch.from_numpy(maps), 50), boxes)
    with pytest.raises(ValueError, match="percentile"):
        introspect.saliency_box(maps, 100)
    with pytest.raises(ValueError, match="N x H x W"):
        introspect.saliency_box(maps[0])


def test_saliency_box_finds_the_region_a_linear_model_reads() -> None:
    # Class 1's score reads only rows 2-5, columns 3-6 of a 12 x 12 image (16 of 144 pixels,
    # all of the top 5%): saliency is |w| there and 0 elsewhere, and the box is that square.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 2))
    with torch.no_grad():
        w = torch.zeros(2, 3, 12, 12)
        w[1, :, 2:6, 3:7] = torch.randn(3, 4, 4).sign()
        model[1].weight.copy_(w.flatten(1))
    sal = introspect.saliency(model, torch.rand(2, 3, 12, 12), target=1)
    assert introspect.saliency_box(sal).tolist() == [[2, 3, 5, 6]] * 2


def _planted_net() -> nn.Sequential:
    """Channel 0 = local brightness (3x3 box filter); class 1's score is its mean, class 0's
    the negative: class 1 is driven by wherever the image is bright."""
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0].fill_(1 / 9)
        conv.weight[1, 0, 1, 1] = -1.0  # a distractor channel: negative where bright
        head.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    return nn.Sequential(conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def test_grad_cam_highlights_the_planted_region() -> None:
    net = _planted_net()
    x = torch.zeros(2, 1, 16, 16)
    x[0, 0, 2:6, 10:14] = 1.0   # a bright square top right
    x[1, 0, 11:15, 1:5] = 1.0   # bottom left
    cam = introspect.grad_cam(net, x, target=1)
    assert cam.shape == (2, 16, 16)
    assert cam.min() >= 0 and cam.max() <= 1 and torch.allclose(cam.flatten(1).amax(1), torch.ones(2))
    for c, (rows, cols), (far_rows, far_cols) in ((cam[0], (slice(2, 6), slice(10, 14)), (slice(10, 16), slice(0, 6))),
                                                  (cam[1], (slice(11, 15), slice(1, 5)), (slice(0, 6), slice(10, 16)))):
        peak = divmod(int(c.argmax()), 16)
        assert rows.start <= peak[0] < rows.stop and cols.start <= peak[1] < cols.stop
        assert c[rows, cols].mean() > 0.6
        assert c[far_rows, far_cols].max() == 0
    # Class 0 has only negative evidence from the bright square: an all-zero map.
    assert introspect.grad_cam(net, x, target=0).abs().max() == 0


def test_grad_cam_defaults_to_the_last_conv_and_restores_training_mode() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 8 * 8, 3))
    net.train()
    x = torch.rand(2, 1, 8, 8)
    default = introspect.grad_cam(net, x, [1, 2])
    torch.testing.assert_close(default, introspect.grad_cam(net, x, [1, 2], layer="2"))
    assert not torch.equal(default, introspect.grad_cam(net, x, [1, 2], layer="0"))
    assert all(m.training for m in net.modules())
    with pytest.raises(KeyError, match="conv layers are: 0, 2"):
        introspect.grad_cam(net, x, 0, layer="nosuch")


def test_feature_maps_and_first_layer_filters() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5 * 3 * 3, 2))
    maps = introspect.feature_maps(net, torch.rand(4, 3, 8, 8), ["0", "2"])
    assert maps["0"].shape == (4, 5, 6, 6) and maps["2"].shape == (4, 5, 3, 3)
    with torch.no_grad():
        net[0].weight[1] = 0
    w = introspect.first_layer_filters(net)
    assert w.shape == (5, 3, 3, 3) and w.min() >= 0 and w.max() <= 1
    assert np.all(w[1] == 0.5)  # a zero filter is mid-grey
    assert np.isclose(np.abs(w[0] - 0.5).max(), 0.5)  # each filter uses the full range
    with pytest.raises(ValueError, match="no Conv2d"):
        introspect.first_layer_filters(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


# ------------------------------------------------------------------ layer table

def test_receptive_fields_and_jumps_of_a_known_stack() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.MaxPool2d(2, 2), nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    rows = introspect.layer_table(net, (1, 16, 16))
    assert [r["name"] for r in rows] == ["0", "2", "3", "4", "6"]
    assert [r["receptive_field"] for r in rows[:4]] == [3, 5, 6, 10]
    assert [r["jump"] for r in rows[:4]] == [1, 1, 2, 2]
    assert rows[-1]["receptive_field"] == 10 + (8 - 1) * 2  # the Linear sees the whole 8x8 map
    assert [r["output_shape"] for r in rows] == [[4, 16, 16], [4, 16, 16], [4, 8, 8], [8, 8, 8], [10]]
    assert rows[0]["macs"] == 16 * 16 * 4 * 9 and rows[2]["macs"] == 0


def test_receptive_field_with_stride_dilation_and_unequal_axes() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, (5, 3), stride=(2, 1)), nn.Conv2d(2, 2, 3, dilation=2))
    rows = introspect.layer_table(net, (1, 20, 20))
    assert rows[0]["receptive_field"] == (5, 3) and rows[0]["jump"] == (2, 1)
    assert rows[1]["receptive_field"] == (5 + 4 * 2, 3 + 4 * 1) and rows[1]["jump"] == (2, 1)


@pytest.mark.parametrize("name,size", [("minivgg", 8), ("lenet5", 8), ("mlp", 8), ("resnet20", 16),
                                       ("googlenet", 32), ("densenet_bc", 16)])
def test_layer_table_sums_to_the_model_totals(name: str, size: int) -> None:
    model = create_model(name, in_channels=1, num_classes=10, image_size=size)
    rows = introspect.layer_table(model, (1, size, size))
    assert sum(r["params"] for r in rows) == count_parameters(model)
    assert sum(r["macs"] for r in rows) == count_macs(model, (1, size, size))


# ------------------------------------------------------------------ what excites a feature map

def test_unit_geometry_of_a_chain_by_hand_agrees_with_the_layer_table() -> None:
    # conv 3 pad 1: unit u sees [u - 1, u + 1]; conv 3 pad 1: [u - 2, u + 2]; pool 2: unit u
    # pools 2u, 2u + 1, so sees [2u - 2, 2u + 3]; conv 3 pad 1 over that: [2u - 4, 2u + 5].
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.MaxPool2d(2, 2), nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    geo = receptive.unit_geometry(net, (1, 16, 16), ["0", "2", "3", "4"])
    by_hand = {"0": Axis(-1, 1, 3), "2": Axis(-2, 1, 5), "3": Axis(-2, 2, 6), "4": Axis(-4, 2, 10)}
    assert {n: g[0] for n, g in geo.items()} == by_hand and all(g[0] == g[1] for g in geo.values())
    table = {r["name"]: r for r in introspect.layer_table(net, (1, 16, 16))}
    for name, axis in by_hand.items():  # on a chain, the table's receptive field and jump
        assert (table[name]["receptive_field"], table[name]["jump"]) == (axis.size, axis.jump)
    # Unit (3, 0) of layer 4 sees rows 2..11 and columns -4..5, cut at the image's edge.
    assert receptive.unit_box(geo["4"], 3, 0, 16, 16) == (2, 0, 11, 5)
    assert receptive.unit_box(geo["4"], 7, 7, 16, 16) == (10, 10, 15, 15)


class _Residual(nn.Module):
    """y = relu(b(relu(a(x))) + shortcut(x)), a downsampling by 2 in both paths."""

    def __init__(self, shortcut: str) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.sc = nn.Conv2d(1, 2, 1, stride=2) if shortcut == "conv" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = self.sc(x) if self.sc is not None else torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 1))
        return torch.relu(self.b(torch.relu(self.a(x))) + short)


@pytest.mark.parametrize("shortcut", ["conv", "slice"])
def test_unit_geometry_follows_a_residual_sum(shortcut: str) -> None:
    # Main path: a (k3 s2 p1) sees [2u - 1, 2u + 1]; b (k3 p1) over it [2u - 3, 2u + 3]: start -3,
    # jump 2, size 7. Shortcut: pixel 2u alone. The sum sees the union: the main path's.
    net = nn.Sequential(_Residual(shortcut))
    geo = receptive.unit_geometry(net, (1, 8, 8), ["0", "0.b"])
    assert geo["0"] == geo["0.b"] == (Axis(-3, 2, 7),) * 2
    if shortcut == "conv":
        assert receptive.unit_geometry(net, (1, 8, 8), ["0.sc"])["0.sc"] == (Axis(0, 2, 1),) * 2
        # The layer table chains every call: the shortcut (called first) into the main path, whose
        # jump comes out 4, not 2, and every unit's position with it.
        assert [(r["name"], r["jump"]) for r in introspect.layer_table(net, (1, 8, 8))] == [
            ("0.sc", 2), ("0.a", 4), ("0.b", 4)]


def test_unit_geometry_names_an_op_it_cannot_follow() -> None:
    class Shuffle(nn.Module):
        def forward(self, x):
            return torch.nn.functional.pixel_unshuffle(x, 2)

    with pytest.raises(receptive.UnknownGeometry, match="pixel_unshuffle changes the feature map size"):
        receptive.unit_geometry(nn.Sequential(nn.Conv2d(1, 1, 3), Shuffle(), nn.Conv2d(4, 1, 1)), (1, 8, 8), ["2"])


def _spot_images() -> torch.Tensor:
    """Seven 1 x 10 x 10 black images, each with one bright pixel: image i's at (i, 9 - i),
    brightness 0.3 + 0.1 i, except images 5 and 6, as bright as each other."""
    x = torch.zeros(7, 1, 10, 10)
    for i in range(7):
        x[i, 0, i, 9 - i] = 0.3 + 0.1 * min(i, 5)
    return x


def test_top_activations_find_the_planted_spots_deterministically() -> None:
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0     # channel 0: the pixel itself
        conv.weight[1, 0].fill_(0.1)      # channel 1: a weaker 3 x 3 sum
    net = nn.Sequential(conv, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 5 * 5, 2))
    x = _spot_images()
    tops = receptive.top_activations(net, x, ["0", "1"], maps=2, k=4, batch_size=3)
    assert tops == receptive.top_activations(net, x, ["0", "1"], maps=2, k=4, batch_size=100)
    assert [len(units) for units in tops["0"]] == [4, 4] and [u[0].channel for u in tops["0"]] == [0, 1]
    units = tops["0"][0]
    # Strongest first; images 5 and 6 tie (0.8): the lower index first.
    assert [(u.image, u.row, u.col) for u in units] == [(5, 5, 4), (6, 6, 3), (4, 4, 5), (3, 3, 6)]
    assert [u.value for u in units] == pytest.approx([0.8, 0.8, 0.7, 0.6])
    assert [u.box for u in units] == [(4, 3, 6, 5), (5, 2, 7, 4), (3, 4, 5, 6), (2, 5, 4, 7)]
    # After pooling by 2, a unit sees 4 x 4 pixels: image 5's spot (5, 4) is unit (2, 2), rows 1..4 + 1.
    pooled = tops["1"][0][0]
    assert (pooled.image, pooled.row, pooled.col, pooled.box) == (5, 2, 2, (3, 3, 6, 6))
    for u in tops["1"][0]:
        spot = (u.image, 9 - u.image)                   # the image's bright pixel is inside its box
        assert u.box[0] <= spot[0] <= u.box[2] and u.box[1] <= spot[1] <= u.box[3]


def _gradient_support(model: nn.Module, x: torch.Tensor, layer: str, unit: receptive.TopUnit) -> tuple[int, ...]:
    """(top, left, bottom, right) of the input pixels the unit's value depends on (its
    gradient's non-zero support): what the receptive-field box must contain."""
    captured = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, a, o: captured.append(o) or o.clone())
    x = x[unit.image:unit.image + 1].clone().requires_grad_(True)
    try:
        model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(captured[0][0, unit.channel, unit.row, unit.col], x)
    rows, cols = np.nonzero(grad[0].abs().amax(0).numpy())
    return (rows.min(), cols.min(), rows.max(), cols.max()) if len(rows) else ()


def test_unit_boxes_through_the_models_own_resizing() -> None:
    from pipeline.training.module import Preprocess

    torch.manual_seed(0)
    net = nn.Sequential(Preprocess([0.5], [0.25], resize=16), nn.Conv2d(1, 2, 3, padding=1)).eval()
    x = torch.rand(3, 1, 8, 8)
    for unit in receptive.top_activations(net, x, ["1"], maps=2, k=20)["1"][0]:
        top, left, bottom, right = _gradient_support(net, x, "1", unit)
        assert unit.box[0] <= top <= bottom <= unit.box[2] and unit.box[1] <= left <= right <= unit.box[3]
        assert unit.box[2] - unit.box[0] <= bottom - top + 2  # a pixel or so wider at most per side


# ------------------------------------------------------------------ deconvnet and guided backpropagation

def _hand_net() -> tuple[nn.Sequential, torch.Tensor]:
    """conv 2x2 -> max pool 2 -> ReLU -> conv 2x2, weights and a 5 x 5 input small enough for pencil."""
    conv1, conv2 = nn.Conv2d(1, 1, 2, bias=False), nn.Conv2d(1, 1, 2, bias=False)
    with torch.no_grad():
        conv1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]).view(1, 1, 2, 2))  # z[p, q] = x[p, q] - x[p+1, q+1]
        conv2.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]).view(1, 1, 2, 2))
    x = torch.tensor([[4, 3, 0, 3, 1], [1, 2, 2, 1, 5], [0, 3, 1, 5, 3], [4, 2, 5, 1, 2], [3, 1, 4, 5, 2]],
                     dtype=torch.float32).view(1, 1, 5, 5)
    return nn.Sequential(conv1, nn.MaxPool2d(2), nn.ReLU(), conv2), x


def test_deconvnet_and_guided_backprop_by_hand() -> None:
    # Forward. z = conv1(x) = [[2, 1, -1, -2], [-2, 1, -3, -2], [-2, -2, 0, 3], [3, -2, 0, -1]].
    # Pooling 2x2 keeps 2 at (0,0), -1 at (0,2) (its whole window is negative), 3 at (3,0), 3 at (2,3):
    # the switches. ReLU: a = [[2, 0], [3, 3]]; conv2: 1*2 + 2*0 + 3*3 - 1*3 = 8, the one unit.
    # Backward from 8 (the activation itself): conv2 transposed gives 8 * w2 = [[8, 16], [24, -8]].
    # Deconvnet: rectify the signal, whatever the forward pass did: [[8, 16], [24, 0]]; guided
    # backprop also zeroes where the forward ReLU input was negative, pooled (0,1) = -1: [[8, 0], [24, 0]].
    # Unpool through the switches to (0,0), (0,2), (3,0); conv1 transposed puts s at (p, q) and -s
    # at (p+1, q+1).
    net, x = _hand_net()
    (units,) = receptive.top_activations(net, x, ["3"], maps=1, k=1)["3"]
    assert [(u.row, u.col, u.value) for u in units] == [(0, 0, 8.0)]
    deconv = torch.zeros(5, 5)
    deconv[0, 0], deconv[1, 1], deconv[0, 2], deconv[1, 3], deconv[3, 0], deconv[4, 1] = 8, -8, 16, -16, 24, -24
    guided = deconv.clone()
    guided[0, 2] = guided[1, 3] = 0
    got, path = projection.project(net, x, "3", units, "deconvnet")
    assert got.shape == (1, 1, 5, 5)
    torch.testing.assert_close(got[0, 0], deconv, rtol=0, atol=0)
    assert path == projection.Path(rectifications=1, max_pools=1, batch_norms=0, others=())
    torch.testing.assert_close(projection.project(net, x, "3", units, "guided_backprop")[0][0, 0], guided,
                               rtol=0, atol=0)
    # The plain gradient differs from both: it keeps the negative signal at pooled (1,1) -> switch (2,3).
    leaf = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(8 * net(leaf)[0, 0, 0, 0], leaf)
    expected = guided.clone()
    expected[2, 3], expected[3, 4] = -8, 8
    torch.testing.assert_close(plain[0, 0], expected, rtol=0, atol=0)
    # Deterministic, batch-independent, and parameter gradients untouched.
    twice = projection.project(net, torch.cat([torch.zeros_like(x), x]), "3",
                               [receptive.TopUnit(0, 1, 0, 0, 8.0, (0, 0, 4, 4))] * 2, "deconvnet")[0]
    assert torch.equal(twice[0], got[0]) and torch.equal(twice[1], got[0])
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="deconvnet, guided_backprop"):
        projection.project(net, x, "3", units, "occlusion")


def test_projection_without_max_pooling_or_relu_says_what_it_did() -> None:
    from pipeline.reports.page import _path_note

    # Strided convolutions and tanh, no pooling: nothing to unpool, no ReLU to rectify at.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Tanh(), nn.BatchNorm2d(2),
                        nn.Conv2d(2, 2, 3, stride=2, padding=1)).eval()
    x = torch.rand(3, 1, 8, 8)
    units = receptive.top_activations(net, x, ["3"], maps=2, k=3)["3"]
    flat = [u for us in units for u in us]
    got, path = projection.project(net, x, "3", flat, "deconvnet")
    assert got.shape == (6, 1, 8, 8) and torch.isfinite(got).all() and got.abs().sum() > 0
    assert path == projection.Path(rectifications=0, max_pools=0, batch_norms=1, others=("tanh",))
    note = _path_note("3", path)
    assert "no max pooling, so no switches" in note and "ordinary derivative: tanh" in note
    assert "1 batch norm (their eval-time per-channel scale)" in note


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_top_activations_work_for_every_registered_model(name: str) -> None:
    size = max(min_image_size(name), 8)
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=3, image_size=size)
    convs = introspect.conv_layers(model)
    if not convs:
        assert name.startswith("mlp")  # and the report says so (test_report_without_convolutions)
        return
    layers = sorted({convs[0], convs[len(convs) // 2], convs[-1]}, key=convs.index)
    x = torch.rand(2, 1, size, size)
    tops = receptive.top_activations(model, x, layers, maps=2, k=9)
    maps = introspect.feature_maps(model, x, layers)
    for layer in layers:
        n, c, h, w = maps[layer].shape
        assert len(tops[layer]) == min(2, c)
        for units in tops[layer]:
            assert len(units) == min(9, n * h * w)
            assert [u.value for u in units] == sorted((u.value for u in units), reverse=True)
            for u in units:
                assert u.value == pytest.approx(float(maps[layer][u.image, u.channel, u.row, u.col]))
                top, left, bottom, right = u.box
                assert 0 <= top <= bottom < size and 0 <= left <= right < size
            # The box holds every pixel the unit's value depends on (shortcuts and concatenations too).
            if support := _gradient_support(model.eval(), x, layer, units[0]):
                assert _inside(units[0].box, support), (layer, units[0], support)
    # Projections to pixels from the last layer (the longest way down, through every kind of layer
    # the model has): one image per unit, never outside the unit's box. (Determinism: the hand test
    # and the byte-identical report; each pass here costs a backward of a large model.)
    units = [u for us in tops[layers[-1]] for u in us]
    for method in projection.METHODS:
        got, path = projection.project(model, x, layers[-1], units, method)
        assert got.shape == (len(units), 1, size, size) and torch.isfinite(got).all() and got.abs().sum() > 0
        for u, p in zip(units, got):
            rows, cols = np.nonzero(p[0].numpy())
            assert not len(rows) or _inside(u.box, (rows.min(), cols.min(), rows.max(), cols.max())), u
        assert path.rectifications > 0 or path.others, path  # every model's ReLUs (LeNet-5: tanh) were met


def _inside(box: tuple[int, ...], support: tuple[int, ...]) -> bool:
    return box[0] <= support[0] <= support[2] <= box[2] and box[1] <= support[1] <= support[3] <= box[3]


def test_report_without_convolutions_says_so(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 6, 6, 1), dtype=np.uint8)
    path = write_report(tmp_path, net=nn.Sequential(nn.Flatten(), nn.Linear(36, 3)), images=images,
                        labels=np.arange(12) % 3, probs=rng.dirichlet(np.ones(3), size=12), classes=["x", "y", "z"],
                        curves=[], seed=0, meta={})
    page = path.read_text()
    for name in ("top-activations", "evolution"):
        section = page.split(f'<section id="{name}">')[1].split("</section>")[0]
        assert "Not available: the model has no convolutional layer, so there is no feature map to project" in section
    assert "saliency box" in page  # localisation needs input gradients only


def test_most_confused_pairs() -> None:
    cm = np.array([[5, 3, 0], [1, 7, 3], [0, 0, 9]])
    pairs = introspect.most_confused_pairs(cm, ["a", "b", "c"], k=2)
    assert [(p["actual"], p["predicted"], p["count"]) for p in pairs] == [("a", "b", 3), ("b", "c", 3)]
    assert pairs[0]["rate"] == pytest.approx(3 / 8)
    assert introspect.most_confused_pairs(np.eye(3, dtype=int), ["a", "b", "c"], 5) == []


def test_diagnose_names_over_fitting() -> None:
    rows = [{"epoch": e, "train/loss": tl, "val/loss": vl, "train/acc": ta, "val/acc": va}
            for e, (tl, vl, ta, va) in enumerate([(1.0, 0.9, 0.6, 0.6), (0.5, 0.5, 0.9, 0.85),
                                                  (0.2, 0.6, 0.97, 0.86), (0.05, 0.8, 0.99, 0.85)])]
    text = " ".join(diagnose(rows))
    assert "gap: +14.0%" in text and "Over-fitting" in text and "risen 60% since epoch 2" in text  # the 2nd epoch, counted from 1


# ------------------------------------------------------------------ the report

def _tiny_report(out: Path, seed: int) -> Path:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(30) % 3
    probs = rng.dirichlet(np.ones(3), size=30)
    curves = [{"epoch": e, "train/loss": 1 / (e + 1), "val/loss": 1.1 / (e + 1), "train/acc": 0.5 + e / 10,
               "val/acc": 0.45 + e / 10, "lr": 0.01} for e in range(3)]
    return write_report(out, net=net, images=images, labels=labels, probs=probs, classes=["x", "y", "z"],
                        curves=curves, seed=seed, meta={"model": "tiny", "dataset": "noise"})


@pytest.mark.slow
def test_report_is_byte_identical_for_a_seed(tmp_path: Path) -> None:
    a, b, c = (_tiny_report(tmp_path / d, s) for d, s in (("a", 1), ("b", 1), ("c", 2)))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()  # another seed picks other examples


def _check_report(path: Path) -> int:
    """Every section present; every embedded image is one of the PNGs in report_files/. Returns N."""
    page = path.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert "src=\"http" not in page and "<link" not in page  # self-contained
    embedded = [base64.b64decode(m) for m in IMG.findall(page)]
    files = {p.name: p.read_bytes() for p in (path.parent / FILES).glob("*.png")}
    assert len(embedded) == page.count("<img") == len(files)
    assert sorted(embedded) == sorted(files.values())
    return len(embedded)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits config (as `digits_cfg`) trained 3 epochs keeping the weights after epochs 1 and 2,
    and evaluated, with its report (guided backpropagation projections)."""
    from pipeline.tasks.data import ensure_data
    from pipeline.tasks.evaluate import evaluate
    from pipeline.tasks.report import report
    from pipeline.tasks.train import train

    tmp = tmp_path_factory.mktemp("report")
    cfg = make_cfg(tmp, ["report.evolution_epochs=[1,2]", "report.projection=guided_backprop"], epochs=3)
    ensure_data(cfg)
    train(cfg)
    evaluate(cfg)
    return cfg, report(cfg)


@pytest.mark.slow
def test_report_end_to_end(trained, tmp_path: Path, monkeypatch) -> None:
    cfg, path = trained
    out = Path(cfg.paths.out_dir)
    assert path == out / "reports" / "report.html"
    n = _check_report(path)
    figures = {p.name for p in (out / "reports" / FILES).glob("*.png")}
    confused = len([f for f in figures if f.startswith("confused_")])
    # curves, confusion matrix, filters, 2 feature-map panels, 10 saliency/Grad-CAM panels, and
    # one top-activations panel per chosen conv (the first, the middle and the last: distinct ones)
    from pipeline.training.network import load_network

    convs = introspect.conv_layers(load_network(out / "models" / "best.ckpt").net)
    chosen = len({convs[0], convs[len(convs) // 2], convs[-1]})
    tops = {f for f in figures if f.startswith("top_activations_")}
    assert tops == {f"top_activations_{i + 1}.png" for i in range(chosen)}
    evolution = {f for f in figures if f.startswith("evolution_")}
    assert evolution == {f"evolution_{i + 1}.png" for i in range(chosen)}
    assert n == 15 + 2 * chosen + confused and {f"saliency_{c}.png" for c in range(10)} <= figures
    # report.evolution_epochs=[1, 2] of 3 epochs: exactly those weights kept, shown, and logged.
    kept = out / "models" / "evolution"
    assert sorted(p.name for p in kept.iterdir()) == ["epoch_1.pt", "epoch_2.pt"]
    page = path.read_text()
    evolution_section = page.split('<section id="evolution">')[1].split("</section>")[0]
    assert "report.evolution_epochs=[1, 2]" in evolution_section and str(kept) in evolution_section
    assert "No weights kept" not in evolution_section and "Not available" not in evolution_section
    assert "guided backpropagation (Springenberg et al. 2015)" in page and "report.projection=guided_backprop" in page
    page = path.read_text()
    assert "Grad-CAM" in page and "Not available" not in page
    assert "saliency box" in page and "95th percentile" in page and "GraphCut step is left out" in page
    assert "strongest single activation over the first" in page and "validation images" in page
    assert "Final train - validation accuracy gap" in page

    run_id = json.loads((out / "models" / "run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{Path(cfg.paths.root) / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id, "report")} == {"report/report.html", f"report/{FILES}"}
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, f"report/{FILES}")}
    assert logged == figures
    assert {a.path for a in client.list_artifacts(run_id, "evolution")} == {"evolution/epoch_1.pt",
                                                                           "evolution/epoch_2.pt"}

    # The DVC stage entry point on the same outputs: byte-identical (same seed).
    from pipeline.cli.stages import run_stage

    params = tmp_path / "params.yaml"
    params.write_text(OmegaConf.to_yaml(cfg))
    before = path.read_bytes()
    assert run_stage("report", str(params)) == 0
    assert path.read_bytes() == before


@pytest.mark.slow
def test_report_for_run_rebuilds_the_logged_model(trained, tmp_path: Path) -> None:
    from pipeline.tasks.report import _curves_from_history, report_for_run

    cfg, _ = trained
    out = Path(cfg.paths.out_dir)
    info = json.loads((out / "models" / "run.json").read_text())
    here = make_cfg(Path(cfg.paths.root), tracking=False)
    here.paths.out_dir = str(tmp_path / "elsewhere")
    path = report_for_run(info["run_id"], here)
    assert path == tmp_path / "elsewhere" / "reports" / "runs" / info["run_id"] / "report.html"
    _check_report(path)
    page = path.read_text()
    assert f"runs:/{info['run_id']}/model" in page  # the logged network itself, eager
    assert "Not available" not in page and "weights loaded into the eager network" not in page
    assert page.count('alt="feature evolution of ') == page.count('alt="top activating patches of ') > 0
    # here's projection (deconvnet, the default), the run's kept epochs: from its folder, else from MLflow.
    assert "report.projection=deconvnet" in page and "report.evolution_epochs=[1, 2]" in page
    from pipeline.tasks.report import _run_epochs

    client = MlflowClient(info["tracking_uri"])
    local, source = _run_epochs(client, info["run_id"], out, kept=True)
    assert [e for e, _ in local] == [1, 2] and source == str(out / "models" / "evolution")
    logged, source = _run_epochs(client, info["run_id"], tmp_path / "gone", kept=True)
    assert source == "the run's MLflow artifacts (evolution/)" and [e for e, _ in logged] == [1, 2]
    # A run whose config kept no epochs is not searched for them in MLflow.
    assert _run_epochs(client, info["run_id"], tmp_path / "gone", kept=False) == ([], "")
    assert all(torch.equal(local[1][1][k], logged[1][1][k]) for k in local[1][1])
    curves = _curves_from_history(MlflowClient(info["tracking_uri"]), info["run_id"])
    on_disk = json.loads((out / "plots" / "train_curves.json").read_text())
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert [{k: r[k] for k in keys} for r in map(file_row, curves)] == [{k: r[k] for k in keys} for r in on_disk]

    # A run logged by an earlier version, as a torch.export program (the newest model of that
    # name is the one runs:/<id>/model resolves to): its weights go into the eager network.
    import mlflow
    import mlflow.pytorch

    from pipeline.tracking.mlflow_run import scoped_tracking_uri
    from pipeline.training.network import load_network

    net = load_network(out / "models" / "best.ckpt").net.eval()
    example = torch.rand(2, int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size)).numpy()
    with scoped_tracking_uri(info["tracking_uri"]), mlflow.start_run(run_id=info["run_id"]):
        mlflow.pytorch.log_model(net, name="model", serialization_format="pt2", input_example=example,
                                 pip_requirements=["torch"])
    page = report_for_run(info["run_id"], here).read_text()
    assert f"runs:/{info['run_id']}/model (weights loaded into the eager network)" in page
    assert "Not available" not in page

    # Neither rebuild nor checkpoint: the exported graph alone, with the limitation stated.
    import pipeline.tasks.report as task

    run_file = out / "models" / "run.json"
    run_file.rename(run_file.with_suffix(".bak"))
    original, task.rebuild_eager = task.rebuild_eager, lambda *a: (_ for _ in ()).throw(ValueError("nope"))
    try:
        limited = report_for_run(info["run_id"], here)
    finally:
        task.rebuild_eager = original
        run_file.with_suffix(".bak").rename(run_file)
    page = limited.read_text()
    assert "Limitation: only the exported torch.export graph" in page and "Could not rebuild" in page
    # filters, feature maps, top activations, feature evolution, Grad-CAM, layer table
    assert page.count("Not available") == 6
    assert len(IMG.findall(page)) == _check_report(limited) >= 12  # curves, confusion, saliency


@pytest.mark.slow
def test_hydra_cli_reports_on_a_run_id(trained, tmp_path: Path) -> None:
    cfg, _ = trained
    info = json.loads((Path(cfg.paths.out_dir) / "models" / "run.json").read_text())
    root = Path(cfg.paths.root)
    cmd = [sys.executable, "-m", "pipeline", "report", f"run_id={info['run_id']}", f"paths.root={root}",
           f"tracking.tracking_uri={info['tracking_uri']}", "tracking.enabled=false", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PIPELINE_VERBOSE": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "reports" / "runs" / info["run_id"] / "report.html").exists()
    # One line per event: no MLflow bar per downloaded file, no log lines in another format.
    out = proc.stdout + proc.stderr
    assert "Downloading artifacts" not in out and "INFO:" not in out and "💡" not in out, out


@pytest.mark.slow
@pytest.mark.integration
def test_report_renders_in_headless_chromium(trained, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
    if not os.access(chromium, os.X_OK):
        pytest.fail("Chromium is not installed: `apt-get install -y chromium` (Debian) to run this test.")
    _, path = trained
    page = path.read_text()
    n = len(IMG.findall(page))
    check = ("<script>window.addEventListener('load', function () {"
             "var imgs = Array.prototype.slice.call(document.images);"
             "var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });"
             "var out = document.createElement('pre'); out.id = 'img-check';"
             "out.textContent = 'images=' + imgs.length + ' broken=' + bad.length;"
             "document.body.appendChild(out); });</script>")
    probe = tmp_path / "report.html"
    probe.write_text(page.replace("</body>", check + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--run-all-compositor-stages-before-draw",
             "--virtual-time-budget=15000", "--window-size=1200,2000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=180)
    assert dom.returncode == 0, dom.stderr[-3000:]
    assert f'<pre id="img-check">images={n} broken=0</pre>' in dom.stdout, dom.stdout[-500:]
    for section in SECTIONS:
        assert f'<section id="{section}">' in dom.stdout
    for section in ("top-activations", "evolution"):  # the projections and the kept epochs, drawn
        assert dom.stdout.split(f'<section id="{section}">')[1].split("</section>")[0].count("<img") >= 1
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=180,
                   check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_cli_takes_run_id_without_a_plus_and_keeps_it_a_string() -> None:
    from pipeline.cli.apps import _with_run_id_key

    assert _with_run_id_key(["run_id=123e4", "model=lenet5", "+run_id=ab"]) == \
        ["+run_id='123e4'", "model=lenet5", "+run_id='ab'"]


def test_an_older_runs_config_still_validates(cfg_factory, tmp_path: Path) -> None:
    from pipeline.config import to_container
    from pipeline.tasks.report import merge_run_config
    from pipeline.validation import prepare

    run = to_container(make_cfg(tmp_path / "elsewhere", ["model=minivgg", "optimizer=adam"]))
    del run["init"], run["regularizer"]["tta"], run["report"]  # keys the pipeline gained after the run
    run["trainer"]["auto_lr"], run["legacy"] = True, 1  # and keys it has dropped since
    here = prepare(cfg_factory(["model=mlp", "optimizer=sgd"]))
    merged = prepare(merge_run_config(OmegaConf.create(run), here))
    assert to_container(merged.model) == run["model"] and to_container(merged.optimizer) == run["optimizer"]
    assert merged.init.scheme == "default" and merged.regularizer.tta == "none"
    assert merged.report.evolution_epochs == [] and merged.report.projection == "deconvnet"
    assert merged.paths.out_dir == here.paths.out_dir


@pytest.mark.parametrize("override,message", [
    ("report.projection=occlusion", "report.projection='occlusion' is not one of: deconvnet, guided_backprop"),
    ("report.evolution_epochs=[0,2]", "report.evolution_epochs="),
    ("report.evolution_epochs=[2,2]", "must be a list of distinct epoch numbers >= 1"),
    ("report.evolution_epochs=5", "or [] to keep no per-epoch checkpoints"),
])
def test_report_keys_are_checked(cfg_factory, override: str, message: str) -> None:
    from pipeline.errors import ConfigError
    from pipeline.validation import PROJECTIONS, prepare

    assert PROJECTIONS == projection.METHODS
    with pytest.raises(ConfigError, match=re.escape(message)):
        prepare(cfg_factory([override]))
