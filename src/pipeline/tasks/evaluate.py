"""The evaluate task: score the best checkpoint on the test split, log into the train run."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig

from pipeline.data.batches import TensorBatches, gather, to_batch
from pipeline.errors import DataError
from pipeline.files import write_with
from pipeline.layout import Layout
from pipeline.quiet import import_mlflow_pytorch
from pipeline.reports.figures import confusion_matrix_png
from pipeline.tasks.common import TrainingData, dataset_inputs, load_data, write_json
from pipeline.tracking.mlflow_run import TrackedRun, scoped_tracking_uri
from pipeline.tracking.registry import model_name, register
from pipeline.tracking.server import check_tracking
from pipeline.training.confusion import class_scores, confusion_matrix
from pipeline.training.metrics import file_row
from pipeline.training.network import TrainedNetwork, load_network
from pipeline.training.regularizers import Regularizers
from pipeline.validation import prepare

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo


@torch.inference_mode()
def predict(net: torch.nn.Module, images: np.ndarray, *, indices: np.ndarray | None = None, batch_size: int = 512,
            regularizer: Mapping[str, Any] | None = None) -> np.ndarray:
    """Class probabilities for the NHWC uint8 `images[indices]` (all when None), in order, as the
    `regularizer` block's evaluation-time entry computes them (e.g. averaged over test-time
    augmentation views). Only a batch's own images are read: `images` may be a memory map."""
    net.eval()
    regularizers = Regularizers(regularizer)
    batches = TensorBatches(images, np.zeros(len(images), dtype=np.int64), indices, batch_size=batch_size,
                            shuffle=False)
    return torch.cat([regularizers.probabilities(net, xb) for xb, _ in batches]).numpy()


def scores(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> tuple[dict, list[dict], np.ndarray]:
    """Overall metrics, per-class rows and the confusion matrix."""
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(labels, pred, len(classes))
    p, r, f1, support = class_scores(cm)
    overall = {
        "acc": float((pred == labels).mean()),
        "loss": float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()),
        "precision_macro": float(p.mean()), "recall_macro": float(r.mean()), "f1_macro": float(f1.mean()),
        "n": int(len(labels)),
    }
    per_class = [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]),
                  "support": int(support[i])} for i, c in enumerate(classes)]
    return overall, per_class, cm


def evaluate(cfg: DictConfig, *, run: TrackedRun | None = None,
             data: TrainingData | None = None) -> dict[str, float]:
    """Score `models/best.ckpt` on the test split; writes `metrics/test.json` and plots.

    Logs into `run` when given (a parallel cross-validation fold's recorded run), else into
    the run `models/run.json` names. `data` is what the train task's `data` is.
    """
    cfg = prepare(cfg, trains=False)
    if run is None:
        check_tracking(cfg.tracking, cfg.paths.root)
    layout = Layout.from_cfg(cfg)
    if not layout.best_ckpt.exists():
        raise DataError(f"No checkpoint at {layout.best_ckpt}: run the train stage first (`dvc repro train`).")
    data = load_data(cfg, layout, data)
    raw, splits = data.raw, data.splits
    module = load_network(layout.best_ckpt)  # plain torch: evaluation never imports Lightning
    _check_fits(module, layout, raw.images.shape[1:], len(raw.classes))
    labels = raw.labels[splits.test]
    probs = predict(module.net, raw.images, indices=splits.test, batch_size=cfg.data.eval_batch_size,
                    regularizer=cfg.regularizer)
    overall, per_class, cm = scores(probs, labels, raw.classes)

    write_json(layout.metrics / "test.json", file_row({f"test/{k}": v for k, v in overall.items()}))
    # Per-sample test probabilities: what paired tests between designs (McNemar) compare.
    # (Not in models/: that folder is the train stage's output and must not change here.)
    write_with(layout.predictions, lambda f: np.save(f, probs.astype(np.float32)))
    write_json(layout.plots / "per_class.json", per_class)
    names = raw.classes
    write_json(layout.plots / "confusion.json",
               [{"actual": names[a], "predicted": names[b]} for a, b in zip(labels, probs.argmax(axis=1))])
    confusion_matrix_png(cm, names, layout.plots / "confusion.png")

    # tracking.register: null is on here, the DVC pipeline's evaluate stage; an ad-hoc run's
    # app sets it false unless asked (pipeline.cli.apps); a cross-validation fold never registers.
    registering = run is None and cfg.data.fold is None and cfg.tracking.register is not False
    if not cfg.tracking.enabled:
        run = None
    elif run is None:
        run = _resume_run(layout)
    with run if run is not None else contextlib.nullcontext():
        if run is not None:
            run.log_inputs(dataset_inputs(layout, data, cfg.data.name, {"testing": ("test", splits.test)}))
            run.log_metrics({f"test/{k}": v for k, v in overall.items() if k != "n"})
            for name in ("confusion.png", "per_class.json", "confusion.json"):
                run.log_artifact(layout.plots / name)
            run.log_artifact(layout.metrics / "test.json")
            if cfg.tracking.log_model:
                info = log_model(run, module.net, gather(raw.images, splits.test[:4]))
                # Here, not in the train stage: the champion is chosen by test accuracy, which
                # only this stage knows, and the model is logged here. Not for a fold's run.
                if registering and run.run_id is not None:
                    register(run.client, model_name(cfg.tracking.experiment_name, cfg.data.name),
                             run_id=run.run_id, model_uri=info.model_uri, model_id=info.model_id,
                             test_acc=overall["acc"])
    return {f"test/{k}": v for k, v in overall.items()}


def _check_fits(module: TrainedNetwork, layout: Layout, image_shape: tuple[int, ...], num_classes: int) -> None:
    """DataError unless the checkpoint's network takes these images and has these classes:
    one trained on other data would fail deep inside the forward pass, or score nonsense."""
    hp = module.hparams
    kw = hp["arch_kwargs"]
    height, _, channels = image_shape
    size = kw.get("image_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    size_ok = hp.get("resize") is not None or size in (None, height)  # Preprocess resizes to its size
    if kw.get("in_channels") != channels or kw.get("num_classes") != num_classes or not size_ok:
        raise DataError(f"{layout.best_ckpt} holds a {hp['arch']} for {size}px {kw.get('in_channels')}-channel "
                        f"images in {kw.get('num_classes')} classes, but {layout.raw} has {height}px {channels}-channel "
                        f"images in {num_classes} classes: it was trained on other data. Train on this data first "
                        "(`dvc repro train`), or point paths.out_dir at the checkpoint's own outputs.")


def _resume_run(layout: Layout) -> TrackedRun | None:
    if not layout.run_file.exists():
        return None
    info = json.loads(layout.run_file.read_text())
    return TrackedRun.resume(tracking_uri=info["tracking_uri"], run_id=info["run_id"])


def log_model(run: TrackedRun, net: torch.nn.Module, example_images: np.ndarray) -> ModelInfo:
    """`mlflow.pytorch.log_model` into the run, with an input example (N, C, H, W) in [0, 1]
    (MLflow infers the signature from it).

    Saved whole (MLflow's "pickle" format), so that `mlflow.pytorch.load_model` gives back
    the network itself, preprocessing included: an `nn.Module` one can `.eval()`, move with
    `.to(device)`, fine-tune or inspect. MLflow 3's default, a `torch.export` program, loads as
    a graph whose `.eval()` and `.train()` raise. Loading needs this package importable (the
    file names its classes); `models.checkpoints.load_mlflow_model` reads it weights-only."""
    import mlflow

    import_mlflow_pytorch()  # as `import mlflow.pytorch`, without its changes to logging
    example = to_batch(example_images).numpy()
    # log_model only speaks to the "current" tracking URI.
    with scoped_tracking_uri(run.tracking_uri), mlflow.start_run(run_id=run.run_id):
        # Explicit requirements skip MLflow's slow import-scanning inference.
        return mlflow.pytorch.log_model(net.cpu().eval(), name="model", input_example=example,
                                        serialization_format="pickle",
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
