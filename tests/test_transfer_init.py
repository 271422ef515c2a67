"""Weight initialisation schemes, transfer learning, and the `pipeline models` listing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.cli.main import main as cli_main
from pipeline.errors import ConfigError
from pipeline.models import create_model, list_models
from pipeline.models.init import INITS, init_weights
from pipeline.models.transfer import freeze, load_state, param_groups, transfer_weights


def _linear(scheme: str, fan_in: int = 400, fan_out: int = 300) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(fan_in, fan_out)
    init_weights(layer, scheme, std=0.05)
    return layer


@pytest.mark.parametrize("scheme, expected_std", [
    ("xavier_uniform", math.sqrt(2 / 700)), ("xavier_normal", math.sqrt(2 / 700)),
    ("kaiming_uniform", math.sqrt(2 / 400)), ("kaiming_normal", math.sqrt(2 / 300)),
    ("normal", 0.05), ("uniform", (1 / 400) / math.sqrt(3)),
])
def test_init_schemes_match_their_distributions(scheme, expected_std):
    layer = _linear(scheme)
    assert layer.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert torch.count_nonzero(layer.bias) == 0


def test_every_scheme_is_tested_and_default_leaves_weights():
    assert set(INITS) == {"xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "normal", "uniform"}
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    before = layer.weight.clone()
    init_weights(layer, "default")
    assert torch.equal(layer.weight, before)
    with pytest.raises(ConfigError, match="init.scheme"):
        init_weights(layer, "orthogonalish")


def test_transfer_replaces_mismatched_head_and_freezes():
    torch.manual_seed(0)
    source = create_model("minivgg", in_channels=1, num_classes=10, image_size=8)
    target = create_model("minivgg", in_channels=1, num_classes=3, image_size=8)
    loaded = transfer_weights(target, source.state_dict())
    head = [n for n, p in target.named_parameters() if p.shape[0] == 3]
    assert head and not set(head) & set(loaded)  # the 3-class head keeps its fresh weights
    for name, p in target.named_parameters():
        if name in loaded:
            assert torch.equal(p, source.state_dict()[name])
    frozen = freeze(target, ["features"])
    assert frozen and all(not p.requires_grad for n, p in target.named_parameters() if n.startswith("features"))
    groups = param_groups(target, loaded, lr=0.1, ratio=0.1)
    lrs = sorted(g["lr"] for g in groups)
    assert lrs == pytest.approx([0.01, 0.1])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in target.parameters())
    with pytest.raises(ConfigError, match="top-level layers"):
        freeze(target, ["nosuchlayer"])


def test_transfer_from_torchvision_layout():
    import torchvision

    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(weights=None, num_classes=1000)
    ours = create_model("resnet18", in_channels=3, num_classes=7, image_size=32)
    loaded = transfer_weights(ours, theirs.state_dict())
    n_params = sum(1 for _ in ours.named_parameters())
    assert len(loaded) == n_params - 2  # everything but the 7-class fc weight and bias
    x = torch.randn(2, 3, 64, 64)
    ours.eval(), theirs.eval()
    ours.fc = theirs.fc  # same head: the two networks now compute the same function
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_load_state_from_file_and_errors(tmp_path):
    model = create_model("mlp", in_channels=1, num_classes=3, image_size=8)
    torch.save({"state_dict": {f"net.1.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "a.ckpt")
    state = load_state(str(tmp_path / "a.ckpt"))
    assert set(state) == set(model.state_dict())
    with pytest.raises(ConfigError, match="no such file"):
        load_state(str(tmp_path / "missing.ckpt"))
    with pytest.raises(ConfigError, match="not a torchvision weights name"):
        load_state("torchvision:NoSuch_Weights.X")


def test_cli_models_lists_every_model(capsys):
    assert cli_main(["models", "--input", "3x32x32", "--classes", "10"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    assert "61,706" not in out  # at 3x32x32 LeNet-5 has more than the 1-channel paper count
    assert cli_main(["models", "--input", "1x32x32"]) == 0
    assert "61,706" in capsys.readouterr().out
