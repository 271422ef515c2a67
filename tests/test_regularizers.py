"""Regularizers against their definitions: penalty gradients, dropout/BN at evaluation,
batch augmentation and test-time augmentation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.data.augment import AugmentConfig, BatchAugment, cutout, hflip, random_crop
from pipeline.errors import ConfigError
from pipeline.models import create_model
from pipeline.training.regularizers import (
    decoupled_weight_decay,
    penalized_parameters,
    penalties,
    tta_probabilities,
)


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **penalty) -> list[torch.Tensor]:
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss = loss + sum(penalties(penalized_parameters(model), **penalty).values(), torch.tensor(0.0))
    loss.backward()
    return [p.grad.clone() for p in penalized_parameters(model)]


def _grad_changes(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  **penalty) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(change of the gradient the penalty makes, the weight) for every penalized parameter."""
    base, pen, weights = _grads(model, x, y), _grads(model, x, y, **penalty), penalized_parameters(model)
    assert len(weights) == 5, "lenet5 has five weights: C1, C3, C5, F6 and the output layer"
    return [(p - b, w) for b, p, w in zip(base, pen, weights, strict=True)]


@pytest.fixture
def toy():
    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, num_classes=3, image_size=8)
    return model.eval(), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])


def test_l1_changes_gradient_by_l1_sign_w(toy):
    model, x, y = toy
    for change, w in _grad_changes(model, x, y, l1=0.01):
        torch.testing.assert_close(change, 0.01 * torch.sign(w), rtol=0, atol=1e-6)


def test_l2_changes_gradient_by_l2_w(toy):
    model, x, y = toy
    for change, w in _grad_changes(model, x, y, l2=0.1):
        torch.testing.assert_close(change, 0.1 * w, rtol=0, atol=1e-6)


def test_elastic_net_gradient(toy):
    model, x, y = toy
    for change, w in _grad_changes(model, x, y, elastic_alpha=0.2, elastic_l1_ratio=0.3):
        torch.testing.assert_close(change, 0.2 * (0.3 * torch.sign(w) + 0.7 * w), rtol=0, atol=1e-6)


def test_biases_and_norms_are_not_penalized():
    model = create_model("minivgg", in_channels=1, num_classes=3, image_size=8)
    names = {id(p) for p in penalized_parameters(model)}
    for name, p in model.named_parameters():
        assert (id(p) in names) == (p.dim() > 1), name


def test_decoupled_weight_decay_shrinks_by_lr_wd():
    w = torch.tensor([1.0, -2.0])
    decoupled_weight_decay([w], lr=0.1, weight_decay=0.5)
    torch.testing.assert_close(w, torch.tensor([0.95, -1.9]))


def test_dropout_inactive_at_evaluation():
    torch.manual_seed(0)
    model = create_model("mlp", in_channels=1, num_classes=3, image_size=8, dropout=0.5)
    x = torch.randn(8, 1, 8, 8)
    model.train()
    assert not torch.equal(model(x), model(x))  # stochastic while training
    model.eval()
    twin = create_model("mlp", in_channels=1, num_classes=3, image_size=8, dropout=0.0)
    twin.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), twin.eval()(x))  # identity at evaluation


def test_batch_norm_uses_running_statistics_at_evaluation():
    torch.manual_seed(0)
    model = create_model("mlp", in_channels=1, num_classes=3, image_size=8, batch_norm=True, hidden_sizes=[16])
    model.train()
    for _ in range(5):
        model(torch.randn(32, 1, 8, 8) * 3 + 1)
    model.eval()
    x = torch.randn(6, 1, 8, 8)
    # In eval mode each sample's output is independent of the rest of the batch.
    torch.testing.assert_close(model(x)[:1], model(x[:1]))
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


# --------------------------------------------------------------------------- augmentation

def _images(n=4, c=3, s=8):
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(1))


def test_hflip_probability_one_and_zero():
    x, g = _images(), torch.Generator().manual_seed(0)
    torch.testing.assert_close(hflip(x, 1.0, g), x.flip(-1))
    torch.testing.assert_close(hflip(x, 0.0, g), x)


def test_random_crop_is_a_shift_with_zero_fill():
    x = _images(n=16)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):  # every output is some 8x8 window of the padded image
        windows = padded[i].unfold(1, 8, 1).unfold(2, 8, 1)  # C, 5, 5, 8, 8
        assert any(torch.equal(windows[:, a, b], out[i]) for a in range(5) for b in range(5))


def test_cutout_zeroes_a_square():
    x = torch.ones(8, 1, 16, 16)
    out = cutout(x, 4, torch.Generator().manual_seed(0))
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert (zeros > 0).all() and (zeros <= 25).all()  # a 5x5 (odd-centred 4) square, clipped at edges


def test_augment_is_seeded_and_shape_preserving():
    cfg = AugmentConfig(hflip=0.5, crop_padding=2, rotation=15, translate=0.1, shear=5,
                        resized_crop_scale=(0.5, 1.0), brightness=0.2, contrast=0.2, saturation=0.2, cutout=3)
    x = _images(n=6)
    a, b = BatchAugment(cfg, seed=3)(x), BatchAugment(cfg, seed=3)(x)
    torch.testing.assert_close(a, b)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, x)


def test_zero_affine_is_identity():
    x = _images()
    cfg = AugmentConfig(rotation=0.0, translate=0.0, shear=0.0)
    assert not cfg.active
    torch.testing.assert_close(BatchAugment(cfg)(x), x)


@pytest.mark.parametrize("kwargs", [{"hflip": 1.5}, {"rotation": -1}, {"resized_crop_scale": (0.9, 0.1)}])
def test_bad_augment_values(kwargs):
    with pytest.raises(ConfigError, match="regularizer.augment"):
        AugmentConfig(**kwargs)


# --------------------------------------------------------------------------- test-time augmentation

def test_tta_modes_give_probabilities_and_flip_averages():
    torch.manual_seed(0)
    net = create_model("mlp", in_channels=1, num_classes=3, image_size=8).eval()
    x = torch.rand(5, 1, 8, 8)
    for mode in ("none", "flip", "ten_crop"):
        p = tta_probabilities(net, x, mode)
        torch.testing.assert_close(p.sum(1), torch.ones(5))
    expected = (tta_probabilities(net, x) + tta_probabilities(net, x.flip(-1))) / 2
    torch.testing.assert_close(tta_probabilities(net, x, "flip"), expected)
    symmetric = (x + x.flip(-1)) / 2
    torch.testing.assert_close(tta_probabilities(net, symmetric, "flip"), tta_probabilities(net, symmetric))
    with pytest.raises(ConfigError, match="regularizer.tta"):
        tta_probabilities(net, x, "five_crop")
