"""Weight initialisation schemes, transfer learning (checkpoints load weights-only), and the
`pipeline models` listing."""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.cli.main import main as cli_main
from pipeline.errors import ConfigError, DataError
from pipeline.models import create_model, list_models
from pipeline.models.init import INITS, init_weights
from pipeline.models.transfer import describe, freeze, load_state, param_groups, transfer_weights
from pipeline.training.module import build_network
from pipeline.training.network import load_network


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
    # What training prints: the source, the fresh head, what froze.
    assert describe(target, "src.ckpt", loaded, frozen, ["features"]) == (
        f"transfer: loaded {len(loaded)} of {len(list(target.parameters()))} parameter tensors from src.ckpt; "
        f"new (fresh weights): classifier.4; froze features ({len(frozen)} tensors)")
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


def _as_ours(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state as our checkpoints hold it: behind Preprocess, in the LightningModule."""
    preprocess = {"net.0.mean": torch.zeros(1, 1, 1, 1), "net.0.std": torch.ones(1, 1, 1, 1)}
    return {**preprocess, **{f"net.1.{k}": v for k, v in model.state_dict().items()}}


def test_load_state_from_file_and_errors(tmp_path):
    model = create_model("mlp", in_channels=1, num_classes=3, image_size=8)
    torch.save({"state_dict": _as_ours(model)}, tmp_path / "a.ckpt")
    state = load_state(str(tmp_path / "a.ckpt"))
    assert set(state) == set(model.state_dict())
    with pytest.raises(ConfigError, match="no such file"):
        load_state(str(tmp_path / "missing.ckpt"))
    with pytest.raises(ConfigError, match="not a torchvision weights name"):
        load_state("torchvision:NoSuch_Weights.X")


class _Payload:
    """Pickles as a call of os.system: loading it unrestricted would run the shell command."""

    def __init__(self, marker: Path) -> None:
        self.command = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self):
        return os.system, (self.command,)


def _payload_ckpt(path: Path, marker: Path) -> Path:
    """A checkpoint that looks like ours (a state_dict of our layout) plus the payload."""
    model = create_model("mlp", in_channels=1, num_classes=3, image_size=8)
    torch.save({"state_dict": _as_ours(model), "hyper_parameters": _Payload(marker)}, path)
    return path


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    evil = _payload_ckpt(tmp_path / "evil.ckpt", tmp_path / "ran")
    # The payload is real: an unrestricted load runs it.
    torch.load(_payload_ckpt(tmp_path / "proof.ckpt", tmp_path / "proof"), weights_only=False)
    assert (tmp_path / "proof").exists()

    with pytest.raises(DataError, match=r"Refused to load .*evil\.ckpt: it holds \S*system, which loading would"):
        load_state(str(evil))
    with pytest.raises(DataError, match="Refused to load"):
        load_network(evil)  # the way evaluate and report read checkpoints back, without Lightning
    assert not (tmp_path / "ran").exists()


def test_a_pickled_module_or_a_non_checkpoint_file_is_refused(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(DataError, match=r"holds torch\.nn\.modules\.linear\.Linear.*state_dict\(\)"):
        load_state(str(tmp_path / "module.pt"))
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(DataError, match="notes.ckpt is not a PyTorch state dict or checkpoint"):
        load_state(str(tmp_path / "notes.ckpt"))
    (tmp_path / "empty.ckpt").touch()
    with pytest.raises(DataError, match="empty.ckpt is not a PyTorch state dict or checkpoint"):
        load_state(str(tmp_path / "empty.ckpt"))


def test_a_payload_given_to_the_cli_exits_2_naming_the_file(tmp_path):
    evil = _payload_ckpt(tmp_path / "evil.ckpt", tmp_path / "ran")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "model=mlp", f"transfer.source={evil}", "tracking.enabled=false",
         f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert f"Refused to load {evil}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ran").exists()


def test_a_plain_state_dict_loads_for_transfer(tmp_path):
    model = create_model("mlp", in_channels=1, num_classes=3, image_size=8)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    state = load_state(str(tmp_path / "weights.pt"))
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_our_own_checkpoints_load_weights_only(cfg_factory, capsys):
    """A checkpoint our train task writes (early stopping, a plateau schedule, Lookahead's
    state) holds nothing beyond torch's weights-only allowlist, and loads for transfer and
    for evaluation."""
    from pipeline.layout import Layout
    from pipeline.tasks.data import ensure_data
    from pipeline.tasks.train import train

    cfg = cfg_factory(["model=mlp", "optimizer=lookahead", "scheduler=plateau"], epochs=1, tracking=False)
    ensure_data(cfg)
    train(cfg, figures=False)
    ckpt = Layout.from_cfg(cfg).best_ckpt
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == []
    net = load_network(ckpt).net
    state = load_state(str(ckpt))
    assert state.keys() == net[1].state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in net[1].state_dict().items())

    # Fine-tuning from it says what it loaded, replaced and froze (the MLP's first layer is `1`).
    source = Path(cfg.paths.root) / "source.ckpt"  # not this run's own best.ckpt, which it replaces
    source.write_bytes(ckpt.read_bytes())
    capsys.readouterr()
    train(cfg_factory(["model=mlp", f"transfer.source={source}", "transfer.freeze=[1]"], epochs=1, tracking=False),
          figures=False)
    assert (f"transfer: loaded 6 of 6 parameter tensors from {source}; new (fresh weights): none; froze 1 (2 tensors)"
            in capsys.readouterr().out.splitlines())


def test_an_mlflow_model_saved_with_pickle_loads_weights_only(tmp_path, monkeypatch):
    """A whole network saved by MLflow (pickle format, as the pipeline logs its models) loads
    weights-only when it names only network classes; one naming anything else is refused
    unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true."""
    import mlflow
    import mlflow.pytorch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    net = build_network("mlp", {"in_channels": 1, "num_classes": 3, "image_size": 8}, mean=[0.5], std=[0.2])
    foreign = build_network("mlp", {"in_channels": 1, "num_classes": 3, "image_size": 8}, mean=[0.5], std=[0.2])
    # Unpickling would look up and hand over a function (not `print`: Ray, once imported in the
    # process, replaces builtins.print, and the file would name Ray's).
    foreign.hook = os.system
    example = torch.zeros(2, 1, 8, 8).numpy()
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(net, name="pickled", serialization_format="pickle", pip_requirements=["torch"])
        mlflow.pytorch.log_model(foreign, name="foreign", serialization_format="pickle", pip_requirements=["torch"])
        mlflow.pytorch.log_model(net, name="exported", serialization_format="pt2", input_example=example,
                                 pip_requirements=["torch"])
    assert load_state(f"runs:/{run.info.run_id}/pickled").keys() == net[1].state_dict().keys()
    with pytest.raises(DataError, match=r"Refused to load runs:/.*/foreign: it names (posix|os)\.system"):
        load_state(f"runs:/{run.info.run_id}/foreign")
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION" not in os.environ  # the switch was scoped to the load
    state = load_state(f"runs:/{run.info.run_id}/exported")
    assert state.keys() == net[1].state_dict().keys()
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # an operator who trusts the server
    assert load_state(f"runs:/{run.info.run_id}/foreign").keys() == net[1].state_dict().keys()


def test_cli_models_lists_every_model(capsys):
    assert cli_main(["models", "--input", "3x32x32", "--classes", "10"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    assert "61,706" not in out  # at 3x32x32 LeNet-5 has more than the 1-channel paper count
    assert cli_main(["models", "--input", "1x32x32"]) == 0
    assert "61,706" in capsys.readouterr().out
