"""The report task: what the trained network learned, as one self-contained HTML page.

`report(cfg)` reads the train/evaluate outputs (best checkpoint, curves, test split) and
writes `<out>/reports/report.html` with its PNGs in `<out>/reports/report_files/`, logged to
the pipeline's MLflow run under `report/`. `report_for_run(run_id, cfg)` does
the same for any MLflow run of this pipeline, from the run's `config.yaml`, its logged
model and its metric history, into `<out>/reports/runs/<run_id>/`.

MLflow 3 logs the model as a `torch.export` graph: it computes gradients, but it cannot
switch mode (`.eval()` raises) and its submodules are only parameter holders, so forward
hooks never fire. `report_for_run` therefore rebuilds the eager network from the run's
config and loads the exported graph's weights into it (checked to give the same outputs);
failing that, the checkpoint the run wrote (if `<run out_dir>/models/run.json` still names
the run); failing that, it reports from the graph itself: predictions and saliency only,
with the limitation stated in the report.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.errors import DataError, PipelineError
from pipeline.layout import Layout
from pipeline.models import count_macs, count_parameters
from pipeline.models.checkpoints import load_file, load_mlflow_model
from pipeline.reports.page import FILES, write_report
from pipeline.tasks.common import load_data
from pipeline.tasks.evaluate import predict
from pipeline.tracking.mlflow_run import TrackedRun, scoped_tracking_uri, tracking_target
from pipeline.tracking.provenance import tree_sha256
from pipeline.tracking.registry import resolve_run_id
from pipeline.tracking.server import check_server, check_tracking
from pipeline.training.metrics import EPOCH_METRICS, read_curves
from pipeline.training.network import build_network, load_network
from pipeline.validation import KEYS, model_args, prepare


def report(cfg: DictConfig) -> Path:
    """Report on `<out>/models/best.ckpt`; returns the path of `report.html`."""
    cfg = prepare(cfg, trains=False)
    check_tracking(cfg.tracking, cfg.paths.root)
    layout = Layout.from_cfg(cfg)
    if not layout.best_ckpt.exists():
        raise DataError(f"No checkpoint at {layout.best_ckpt}: run the train stage first (`dvc repro train`).")
    curves = read_curves(layout.plots / "train_curves.json")
    net = load_network(layout.best_ckpt).net.eval()
    info = json.loads(layout.run_file.read_text()) if layout.run_file.exists() else None
    meta = {"run id": info["run_id"] if info else "(not tracked)", "weights": str(layout.best_ckpt)}
    evolution = (_kept_epochs(layout.evolution), str(layout.evolution))
    path = _write(cfg, cfg, net, curves, Path(cfg.paths.out_dir) / "reports", meta, [], eager=True,
                  evolution=evolution)
    if cfg.tracking.enabled and info:
        with TrackedRun.resume(tracking_uri=info["tracking_uri"], run_id=info["run_id"]) as run:
            run.log_artifact(path, "report")
            run.client.log_artifacts(run.run_id, str(path.parent / FILES), f"report/{FILES}")
    return path


def report_for_run(run_id: str, cfg: DictConfig) -> Path:
    """Report on any MLflow run of this pipeline in `cfg`'s tracking store, into
    `<cfg out>/reports/runs/<run_id>/`. `run_id` may also name a registered model version,
    `models:/<name>@champion` or `models:/<name>/<version>`: the run that logged it.

    The run's own config.yaml chooses dataset, split, model and evaluation settings; `cfg`
    gives the local paths (data is fetched and split as the run did if missing) and the
    seed for picking examples. With `cfg.tracking.enabled` the report is also logged to
    the run under `report/` (the run's status is left as it was).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tasks.data import ensure_data

    cfg = prepare(cfg, trains=False)
    tracking_uri = tracking_target(cfg.tracking, cfg.paths.root)["tracking_uri"]
    check_server(tracking_uri, cfg.tracking.experiment_name)  # read even with tracking off
    client = MlflowClient(tracking_uri)
    try:
        run_id = resolve_run_id(client, run_id)  # a registered model (models:/<name>@champion): its run
        run = client.get_run(run_id)
        with tempfile.TemporaryDirectory() as tmp:
            run_cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", tmp))
    except (MlflowException, OSError) as err:
        raise DataError(f"Run {run_id} at {tracking_uri} has no config.yaml artifact, so it was not made by this "
                        f"pipeline (or does not exist): {err}") from err
    run_out = Path(str(run_cfg.paths.out_dir))
    run_cfg = prepare(merge_run_config(run_cfg, cfg), trains=False)
    ensure_data(run_cfg)
    layout = Layout.from_cfg(run_cfg)
    notes = []
    if run.data.tags.get("split_sha256") not in (None, tree_sha256(layout.splits)):
        notes.append(f"The local split {layout.splits} differs from the run's (split_sha256 tag): the test images "
                     "are not the run's test split.")
    classes = json.loads((layout.raw / "classes.json").read_text())
    net, source, eager = _run_network(run_id, tracking_uri, run_cfg, len(classes), run_out, notes)
    curves = _curves_from_history(client, run_id)
    out = Path(cfg.paths.out_dir) / "reports" / "runs" / run_id
    meta = {"run id": run_id, "tracking URI": tracking_uri, "run status": run.info.status, "weights": source}
    evolution = _run_epochs(client, run_id, run_out, kept=bool(run_cfg.report.evolution_epochs))
    path = _write(run_cfg, cfg, net, curves, out, meta, notes, eager=eager, evolution=evolution)
    if cfg.tracking.enabled:
        client.log_artifacts(run_id, str(out), "report")
    return path


def merge_run_config(run_cfg: DictConfig, cfg: DictConfig) -> DictConfig:
    """A run's config.yaml on top of the current config, so a run made before the pipeline
    grew new keys still validates: new keys keep their current defaults, every key the run
    has keeps the run's value, the option-specific groups (model, optimizer, scheduler) are
    the run's whole, and `paths` are this machine's (from `cfg`). Keys the pipeline has since
    dropped are left out, which validation would refuse as unknown."""
    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    merged = OmegaConf.merge(base, _without_dropped_keys(run_cfg))
    for group in ("model", "optimizer", "scheduler"):
        if group in run_cfg:
            merged[group] = run_cfg[group]
    merged.paths = base.paths
    return merged


def _without_dropped_keys(run_cfg: DictConfig) -> DictConfig:
    """A copy of `run_cfg` without the keys `validation.KEYS` no longer lists."""
    run = OmegaConf.create(OmegaConf.to_container(run_cfg))
    for block, known in KEYS.items():
        node = OmegaConf.select(run, block) if block else run
        if OmegaConf.is_dict(node):
            for key in [k for k in node if k not in known]:
                node.pop(key)
    return run


def _kept_epochs(folder: Path) -> list[tuple[int, dict]]:
    """The (epoch, state dict) pairs the train stage kept in `folder` (`epoch_<n>.pt`), by epoch."""
    found = []
    for path in folder.glob("epoch_*.pt"):
        epoch = path.stem.removeprefix("epoch_")
        if epoch.isdigit():
            found.append((int(epoch), load_file(path)))  # weights-only, as every checkpoint
    return sorted(found, key=lambda e: e[0])


def _run_epochs(client, run_id: str, run_out: Path, *, kept: bool) -> tuple[list[tuple[int, dict]], str]:
    """A run's kept weights: from its output folder if that still holds this run's, else from
    its MLflow artifacts (`evolution/`) if the run kept any (`kept`: its config asked for
    some); with where they came from."""
    from mlflow.exceptions import MlflowException

    run_file, local = run_out / "models" / "run.json", run_out / "models" / "evolution"
    if run_file.exists() and json.loads(run_file.read_text()).get("run_id") == run_id and (weights := _kept_epochs(local)):
        return weights, str(local)
    if not kept:  # nothing to look for: a download that finds nothing still costs requests
        return [], ""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = Path(client.download_artifacts(run_id, "evolution", tmp))
        except (MlflowException, OSError):
            return [], ""
        return _kept_epochs(folder), "the run's MLflow artifacts (evolution/)"


def _write(run_cfg: DictConfig, cfg: DictConfig, net: nn.Module, curves: list[dict], out: Path, meta: dict,
           notes: list[str], *, eager: bool, evolution: tuple[list[tuple[int, dict]], str]) -> Path:
    data = load_data(run_cfg, Layout.from_cfg(run_cfg))
    raw, splits = data.raw, data.splits
    images, labels = raw.images[splits.test], raw.labels[splits.test]
    if eager:
        probs = predict(net, images, batch_size=run_cfg.data.eval_batch_size, regularizer=run_cfg.regularizer)
    else:
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)
            probs = torch.cat([net(x[i:i + 256]).softmax(1) for i in range(0, len(x), 256)]).numpy()
        if run_cfg.regularizer.tta != "none":
            notes.append(f"Predictions without the run's test-time augmentation ({run_cfg.regularizer.tta}).")
    shape = (int(run_cfg.data.channels), int(run_cfg.data.image_size), int(run_cfg.data.image_size))
    meta = {**meta, "model": run_cfg.model.name, "dataset": run_cfg.data.name, "test images": len(labels),
            "test accuracy": f"{float((probs.argmax(1) == labels).mean()):.2%}",
            "parameters": f"{count_parameters(net):,}",
            "MACs per image": f"{count_macs(net, shape):,}" if eager else "n/a",
            "test-time augmentation": run_cfg.regularizer.tta if eager else "none", "seed (examples)": cfg.seed}
    return write_report(out, net=net, images=images, labels=labels, probs=probs, classes=raw.classes,
                        curves=curves, seed=int(cfg.seed), meta=meta, notes=notes, hooks=eager,
                        val_images=raw.images[splits.val], projection_method=cfg.report.projection,
                        # The epochs the run asked for, and any it kept under another setting.
                        evolution=evolution[0],
                        evolution_epochs=sorted({*run_cfg.report.evolution_epochs, *(e for e, _ in evolution[0])}),
                        evolution_source=evolution[1])


def _curves_from_history(client, run_id: str) -> list[dict]:
    """train_curves.json's rows ({epoch, train/loss, ...}) from the run's per-epoch metrics."""
    rows: dict[int, dict] = {}
    for key in EPOCH_METRICS:
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
            rows.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return [rows[s] for s in sorted(rows)]


def rebuild_eager(exported: nn.Module, run_cfg: DictConfig, num_classes: int) -> nn.Sequential:
    """The pipeline's eager `Sequential(Preprocess, model)` with an exported model's weights.

    Raises ValueError unless both give the same scores on random inputs.
    """
    state = exported.state_dict()
    args = model_args(run_cfg, num_classes=num_classes)
    net = build_network(args.pop("name"), args, mean=state["0.mean"].flatten().tolist(),
                        std=state["0.std"].flatten().tolist(), resize=run_cfg.data.resize)
    net.load_state_dict(state, strict=True)
    net.eval()
    size = int(run_cfg.data.image_size)
    x = torch.rand(2, int(run_cfg.data.channels), size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.allclose(net(x), exported(x), atol=1e-4, rtol=1e-4):
            raise ValueError("the rebuilt network's scores differ from the exported model's")
    return net


def _run_network(run_id: str, tracking_uri: str, run_cfg: DictConfig, num_classes: int, run_out: Path,
                 notes: list[str]) -> tuple[nn.Module, str, bool]:
    """(network, where its weights came from, whether it is an eager module) for a run."""
    uri = f"runs:/{run_id}/model"
    loaded = None
    try:
        with scoped_tracking_uri(tracking_uri):
            loaded = load_mlflow_model(uri)  # weights-only, as transfer learning reads it
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds for "no model"
        notes.append(f"No loadable MLflow model at {uri} ({type(err).__name__}).")
    if loaded is not None and not isinstance(loaded, torch.fx.GraphModule):
        return loaded.eval(), uri, True  # the eager module (logged whole, as MLflow 2 did and we do again)
    if loaded is not None:
        try:
            return rebuild_eager(loaded, run_cfg, num_classes), f"{uri} (weights loaded into the eager network)", True
        except (PipelineError, KeyError, RuntimeError, ValueError) as err:
            notes.append(f"Could not rebuild the eager network from {uri}: {err}")
    ckpt, run_file = run_out / "models" / "best.ckpt", run_out / "models" / "run.json"
    if ckpt.exists() and run_file.exists() and json.loads(run_file.read_text()).get("run_id") == run_id:
        return load_network(ckpt).net.eval(), str(ckpt), True
    if loaded is None:
        raise DataError(f"Run {run_id} has no loadable model ({uri}) and its checkpoint {ckpt} is gone or "
                        "belongs to another run.")
    notes.append("Limitation: only the exported torch.export graph is available. It cannot take forward hooks "
                 "or switch mode, so the first-layer filters, feature maps, Grad-CAM and the layer table are "
                 "omitted; predictions and saliency (input gradients) are exact.")
    return loaded, uri, False
