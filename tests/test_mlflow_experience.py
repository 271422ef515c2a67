"""What a user sees of a run in MLflow, checked through MLflow's own client and loaders (issue
#16): the experiment marked as model development (the UI opens on its runs table), each run's
datasets as MLflow datasets, MLflow's own source tags, and a logged model that loads as an
`nn.Module` a user can put in eval mode, move, and predict with.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlflow
import mlflow.models
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils

from conftest import make_cfg
from pipeline.data.batches import to_tensors
from pipeline.layout import Layout
from pipeline.tasks.common import dataset_inputs, load_data
from pipeline.tasks.data import ensure_data
from pipeline.tasks.evaluate import evaluate
from pipeline.tasks.train import train
from pipeline.tracking.mlflow_run import KIND_TAG, MODEL_DEVELOPMENT

EXPERIMENT = "cnn-pipeline"


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch: pytest.MonkeyPatch):
    """Tiny models train fastest on one thread on a shared 2-CPU machine; MLflow's
    process-global tracking URI is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    yield
    torch.set_num_threads(before)


def _git_repo(root: Path) -> str:
    """Make `root` a git repository with one commit; its HEAD."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (root / "README").write_text("a project\n")
    git("add", "README")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "start")
    return git("rev-parse", "HEAD")


def _runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _inputs(run) -> dict[str, tuple[str, str, str]]:
    """{context: (name, digest, source)} of a run's dataset inputs."""
    found = {}
    for item in run.inputs.dataset_inputs:
        context = {t.key: t.value for t in item.tags}["mlflow.data.context"]
        assert context not in found, f"{context} logged twice"
        found[context] = (item.dataset.name, item.dataset.digest, json.loads(item.dataset.source)["uri"])
    return found


@pytest.mark.integration
@pytest.mark.slow
def test_runs_carry_their_datasets_source_and_kind(tmp_path: Path) -> None:
    head = _git_repo(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shared = [f"tracking.tracking_uri={store}", f"tracking.artifact_location={tmp_path / 'mlartifacts'}",
              "tracking.log_model=false"]
    first = make_cfg(tmp_path / "a", shared, epochs=1)
    other = make_cfg(tmp_path / "b", [*shared, "data.split.seed=1"], epochs=1)  # another split
    for cfg in (first, other):
        ensure_data(cfg)
        train(cfg)
        evaluate(cfg)

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags[KIND_TAG] == MODEL_DEVELOPMENT == "custom_model_development"
    runs = _runs(client)
    assert len(runs) == 2
    seen = []
    for run, cfg in zip(runs, (first, other)):
        inputs = _inputs(run)
        assert set(inputs) == {"training", "validation", "testing"}
        raw = str(Layout.from_cfg(cfg).raw)
        for name, digest, source in inputs.values():
            assert name == "digits" and len(digest) == 8 and source == raw
        assert len({digest for _, digest, _ in inputs.values()}) == 3  # three subsets, three digests
        seen.append(inputs)
        # MLflow's own source tags, beside ours: the commit is the repository's HEAD.
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == tags["git_commit"] == head
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.name"]
        assert tags["mlflow.user"]
    for context in ("training", "validation", "testing"):
        assert seen[0][context][1] != seen[1][context][1], context  # other split: other digest

    # The same split and subsets give the same digests: runs on the same data read alike.
    data = load_data(first, Layout.from_cfg(first))
    again = dataset_inputs(Layout.from_cfg(first), data, "digits", {"training": ("train", data.splits.train)})
    assert again[0]["digest"] == seen[0]["training"][1]


def test_an_existing_experiment_is_marked_unless_its_kind_was_chosen(tmp_path: Path) -> None:
    from pipeline.tracking.mlflow_run import get_experiment_id

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    plain = client.create_experiment("made-elsewhere")
    guessed = client.create_experiment("guessed", tags={KIND_TAG: "genai_development_inferred"})
    chosen = client.create_experiment("chosen", tags={KIND_TAG: "genai_development"})
    assert get_experiment_id(client, "made-elsewhere", None) == plain
    assert get_experiment_id(client, "guessed", None) == guessed
    assert get_experiment_id(client, "chosen", None) == chosen
    assert client.get_experiment(plain).tags[KIND_TAG] == MODEL_DEVELOPMENT
    assert client.get_experiment(guessed).tags[KIND_TAG] == MODEL_DEVELOPMENT
    assert client.get_experiment(chosen).tags[KIND_TAG] == "genai_development"  # a person's choice stays


@pytest.mark.integration
@pytest.mark.slow
def test_the_logged_model_is_a_network_a_user_can_use(digits_cfg, tmp_path: Path, monkeypatch) -> None:
    train(digits_cfg)
    evaluate(digits_cfg)
    layout = Layout.from_cfg(digits_cfg)
    run_id = json.loads(layout.run_file.read_text())["run_id"]
    expected = np.load(layout.predictions)  # the run's own test probabilities

    # What a user types.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    uri = f"runs:/{run_id}/model"
    model = mlflow.pytorch.load_model(uri)
    assert isinstance(model, torch.nn.Module) and not isinstance(model, torch.fx.GraphModule)
    model = model.eval().to("cpu")
    assert not model.training
    state = model.state_dict()
    assert {"0.mean", "0.std"} <= set(state)  # normalisation inside the model
    data = load_data(digits_cfg, layout)
    images = data.raw.images[data.splits.test]
    x = to_tensors(images, np.zeros(len(images)))[0].float().div(255)  # raw [0, 1] images, NCHW
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-5)
    model.train()  # an eager module switches mode (a torch.export graph raises here)
    assert model.training

    # pyfunc on a numpy batch; the signature and input example kept.
    pyfunc = mlflow.pyfunc.load_model(uri)
    logits = pyfunc.predict(x.numpy())
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), dim=1).numpy(), expected, rtol=1e-4, atol=1e-5)
    info = mlflow.models.get_model_info(uri)
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, *x.shape[1:])
    assert info.saved_input_example_info is not None

    # The pipeline's own reader (transfer learning, reports) takes it weights-only.
    from pipeline.models.transfer import load_state

    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    weights = load_state(uri)
    own = {k[len("1."):]: v for k, v in state.items() if k.startswith("1.")}
    assert weights.keys() == own.keys() and all(torch.equal(weights[k], own[k]) for k in own)

    # The registry (tracking.register: null is on for the evaluate task, as in the DVC
    # pipeline): version 1 of "<experiment>-<dataset>" and its champion.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = "cnn-pipeline-digits"
    first = client.get_model_version_by_alias(name, "champion")
    assert (first.version, first.run_id) in (("1", run_id), (1, run_id))
    test_acc = json.loads(layout.metrics.joinpath("test.json").read_text())["test_acc"]
    assert client.get_run(run_id).data.tags["registry.champion"].startswith(f"champion: {test_acc:.4f}")
    champion = load_state(f"models:/{name}@champion")  # what transfer.source accepts
    assert champion.keys() == own.keys() and all(torch.equal(champion[k], own[k]) for k in own)
    # `pipeline report run_id=models:/<name>@champion`: the report of the run that logged it.
    from pipeline.tasks.report import report_for_run

    assert report_for_run(f"models:/{name}@champion", digits_cfg).parent.name == run_id
    _the_champion_moves_only_on_a_better_test_accuracy(client, name, run_id, first.source, test_acc)


def _the_champion_moves_only_on_a_better_test_accuracy(client: MlflowClient, name: str, run_id: str, source: str,
                                                       test_acc: float) -> None:
    """More versions of the same logged model, as if scored lower, equal, then higher."""
    from pipeline.tracking.registry import register, resolve_run_id

    lower = register(client, name, run_id=run_id, model_uri=source, model_id=None, test_acc=test_acc - 0.01)
    assert not lower.champion and lower.reason == f"kept version 1: {test_acc - 0.01:.4f} <= {test_acc:.4f}"
    equal = register(client, name, run_id=run_id, model_uri=source, model_id=None, test_acc=test_acc)
    assert not equal.champion  # a tie keeps the older champion
    higher = register(client, name, run_id=run_id, model_uri=source, model_id=None, test_acc=test_acc + 0.001)
    assert higher.champion and higher.version == "4"
    assert higher.reason == f"champion: {test_acc + 0.001:.4f} > {test_acc:.4f} (version 1)"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "4"
    assert client.get_model_version(name, "4").description == higher.reason
    assert client.get_run(run_id).data.tags["registry.champion"] == higher.reason  # the run says why
    assert resolve_run_id(client, f"models:/{name}@champion") == run_id == resolve_run_id(client, f"models:/{name}/2")


def test_a_pickled_model_naming_anything_but_network_classes_is_refused(tmp_path: Path) -> None:
    from pipeline.errors import DataError
    from pipeline.models.checkpoints import load_network_file

    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    torch.save(net, tmp_path / "fine.pth")
    assert isinstance(load_network_file(tmp_path / "fine.pth", "fine"), torch.nn.Sequential)
    # A function the file would make unpickling look up (not `print`: Ray, once imported in
    # the process, replaces builtins.print, and the file would name Ray's).
    net.hook = os.system
    torch.save(net, tmp_path / "bad.pth")
    with pytest.raises(DataError, match=r"names (posix|os)\.system"):
        load_network_file(tmp_path / "bad.pth", "bad")


@pytest.mark.integration
def test_a_train_run_records_system_metrics(cfg_factory, tmp_path: Path) -> None:
    cfg = cfg_factory(["tracking.system_metrics_interval_s=0.5", "tracking.log_model=false"], epochs=3)
    ensure_data(cfg)
    train(cfg)
    run = _runs(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"))[0]
    metrics = run.data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics), sorted(metrics)
    assert metrics["system/system_memory_usage_megabytes"] > 0

    off = cfg_factory(["tracking.system_metrics=false", "tracking.system_metrics_interval_s=0.5",
                       "tracking.log_model=false", "tracking.experiment_name=off"], epochs=3)
    train(off)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [quiet] = client.search_runs([client.get_experiment_by_name("off").experiment_id])
    assert not any(k.startswith("system/") for k in quiet.data.metrics)


def test_a_bad_system_metrics_interval_is_a_config_error(cfg_factory) -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tracking\.system_metrics_interval_s=0 is out of range"):
        train(cfg_factory(["tracking.system_metrics_interval_s=0"]))


@pytest.mark.integration
@pytest.mark.slow
def test_sweep_trials_record_system_metrics_when_asked(cfg_factory, tmp_path: Path, monkeypatch) -> None:
    from pipeline.tasks.tune import tune

    monkeypatch.setenv("RAY_ADDRESS", "local")  # a Ray of our own, not another test run's
    cfg = cfg_factory(["model=mlp", "tune.num_cpus=2", "tune.max_concurrent_trials=2", "tune.num_samples=2",
                       "tune.max_epochs=2", "tune.scheduler=fifo", "tune.system_metrics=true"])
    ensure_data(cfg)
    tune(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = _runs(client)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    for child in children:
        for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
            history = client.get_metric_history(child.info.run_id, key)
            assert sorted(m.step for m in history) == [0, 1], key  # one sample per epoch
        assert 0 < child.data.metrics["system/system_memory_usage_megabytes"]


def test_a_bad_tune_system_metrics_is_a_config_error(cfg_factory) -> None:
    from pipeline.errors import ConfigError
    from pipeline.tasks.tune import check_sweep

    with pytest.raises(ConfigError, match=r"tune\.system_metrics"):
        check_sweep(cfg_factory(["tune.system_metrics=maybe"]))


def test_a_bad_tracking_register_is_a_config_error(cfg_factory) -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tracking\.register must be true, false or null"):
        evaluate(cfg_factory(["tracking.register=yes"]))
    with pytest.raises(ConfigError, match=r"tracking\.register=true .* tracking\.log_model=false"):
        evaluate(cfg_factory(["tracking.register=true", "tracking.log_model=false"]))
