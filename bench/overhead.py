"""Lightning overhead: the pipeline's training path versus a bare PyTorch loop.

Both sides train the same network (``build_network``: ``Preprocess`` + ``create_model``)
with the same optimizer (the config's, at a constant rate: ``scheduler=none``), on the same
``TensorBatches`` of the same training split, for the same number of optimizer steps, in one
process with the same torch thread count, seed and determinism setting:

(a) pipeline: the train task's own builders (``pipeline.training.builders``): the data
    module, the ``Classifier`` as ``pipeline.tasks.train.configured_module`` builds it
    (regularizer and init settings included), and the Trainer of ``build_trainer``
    (``logger=False``, deterministic as configured, the ``EpochRecorder`` callback),
    overridden only where the bench must: CPU, no progress bar, no checkpointing, no
    validation (``limit_val_batches=0``), ``max_steps``.
(b) bare: forward, cross-entropy (with the configured label smoothing), train-mode accuracy
    and batch-size-weighted epoch sums (what the module logs per epoch),
    ``zero_grad(set_to_none=True)``, backward, step. It implements the default regularizer
    settings only (no penalties, decoupled decay or augmentation); with others the two sides
    would do different work, which the "final loss" column would show.

Both start from the same weights and see the same batches, so they end with the same
training loss (the "final loss" column: the last epoch's mean); a mismatch means the two
sides no longer do the same work.

Each run does ``--warmup`` steps and then ``--steps`` timed steps; only the timed steps
count (the clock starts when step ``warmup + 1`` begins and stops when step
``warmup + steps`` ends), so one-off costs (Trainer setup, first-call allocations) are
excluded. The two sides alternate ``--repeats`` times and the best run of each is kept.

    .venv/bin/python bench/overhead.py [--model minivgg] [--steps 600] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from pipeline.config import compose, to_container
from pipeline.data.batches import TensorBatches
from pipeline.data.datamodule import ArrayDataModule
from pipeline.data.sources import load_source
from pipeline.data.splits import stratified_split
from pipeline.tasks.train import configured_module
from pipeline.training.builders import build_datamodule, build_trainer, input_stats
from pipeline.training.callbacks import EpochRecorder
from pipeline.training.module import build_network
from pipeline.training.optim import build_optimizer
from pipeline.validation import model_args

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class Setup:
    """Everything both sides share: data, split, and the config (architecture, batch size,
    optimisation settings)."""

    images: np.ndarray
    labels: np.ndarray
    train_idx: np.ndarray
    num_classes: int
    cfg: DictConfig

    def datamodule(self) -> ArrayDataModule:
        # The training split only: neither side validates.
        return build_datamodule(self.images, self.labels, self.cfg.data, train_idx=self.train_idx,
                                val_idx=self.train_idx[:0], seed=self.cfg.seed)


@dataclass
class Result:
    seconds: float  # wall clock
    cpu: float  # CPU time of the whole process over the same steps
    samples: int
    steps: int
    final_loss: float


def make_setup(args: argparse.Namespace, download_dir: Path) -> Setup:
    # A constant rate: a schedule is one call per epoch, not what is measured, and LR
    # schedulers that need the run length in epochs do not fit a run cut by max_steps.
    overrides = [f"model={args.model}", f"data={args.data}", "scheduler=none"]
    if args.batch_size:
        overrides.append(f"data.batch_size={args.batch_size}")
    cfg = compose(overrides, conf=CONF_DIR)
    images, labels, classes, _ = load_source(cfg.data.name, download_dir=download_dir)
    split = cfg.data.split
    train_idx, _, _ = stratified_split(labels, val_fraction=split.val_fraction,
                                       test_fraction=split.test_fraction, seed=split.seed)
    return Setup(images=images, labels=labels, train_idx=train_idx, num_classes=len(classes), cfg=cfg)


# ----------------------------------------------------------------------------- (a) Lightning


class _StepClock(Callback):
    """Starts the clock as optimizer step `warmup + 1` begins, stops it when `last` ends."""

    def __init__(self, warmup: int, last: int) -> None:
        self.warmup, self.last = warmup, last
        self.start = self.stop = self.cpu_start = self.cpu_stop = 0.0
        self.samples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
        if trainer.global_step >= self.warmup:
            self.samples += len(batch[1])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.last:
            self.stop, self.cpu_stop = time.perf_counter(), time.process_time()


def run_pipeline(s: Setup, warmup: int, steps: int) -> Result:
    cfg = s.cfg
    torch.manual_seed(cfg.seed)
    dm = s.datamodule()
    module = configured_module(cfg, dm, num_classes=s.num_classes)
    clock = _StepClock(warmup, warmup + steps)
    with tempfile.TemporaryDirectory() as root:
        trainer = build_trainer(cfg.trainer, [EpochRecorder(None), clock], root_dir=root, max_steps=warmup + steps,
                                max_epochs=-1, accelerator="cpu", devices=1, enable_progress_bar=False,
                                enable_checkpointing=False, limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == warmup + steps and clock.stop > 0.0
    return Result(clock.stop - clock.start, clock.cpu_stop - clock.cpu_start, clock.samples, steps,
                  float(trainer.callback_metrics.get("train/loss", float("nan"))))


# ----------------------------------------------------------------------------- (b) bare loop


def run_bare(s: Setup, warmup: int, steps: int) -> Result:
    cfg = s.cfg
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(bool(cfg.trainer.deterministic))
    dm = s.datamodule()
    batches = TensorBatches(dm.images, dm.labels, dm.parts["train"], batch_size=cfg.data.batch_size, shuffle=True,
                            seed=cfg.seed)
    # The network alone (Preprocess + model), as `configured_module` builds it inside its Classifier.
    mean, std = input_stats(dm, cfg.data)
    arch_kwargs = model_args(cfg, num_classes=s.num_classes)
    net = build_network(arch_kwargs.pop("name"), arch_kwargs, mean=mean, std=std, resize=cfg.data.resize,
                        init=to_container(cfg.init))
    net.train()
    opt_cfg = to_container(cfg.optimizer)
    optimizer = build_optimizer(net.parameters(), opt_cfg.pop("name"), **opt_cfg)
    smoothing = float(cfg.regularizer.label_smoothing)

    total = warmup + steps
    step = samples = epoch = 0
    start = stop = cpu_start = cpu_stop = 0.0
    epoch_loss = 0.0
    while step < total:
        batches.set_epoch(epoch)
        loss_sum = torch.zeros(())
        acc_sum = torch.zeros(())
        seen = 0
        for xb, yb in batches:
            if step == warmup:
                start, cpu_start = time.perf_counter(), time.process_time()
            if step >= warmup:
                samples += len(yb)
            logits = net(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=smoothing)
            acc = (logits.argmax(dim=1) == yb).float().mean()
            n = len(yb)
            loss_sum += loss.detach() * n
            acc_sum += acc * n
            seen += n
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == total:
                stop, cpu_stop = time.perf_counter(), time.process_time()
                break
        epoch_loss, _epoch_acc = float(loss_sum / seen), float(acc_sum / seen)  # as logged
        epoch += 1
    return Result(stop - start, cpu_stop - cpu_start, samples, steps, epoch_loss)


# ----------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minivgg", help="a conf/model/ name (default minivgg)")
    parser.add_argument("--data", default="digits", help="a conf/data/ name that needs no download")
    parser.add_argument("--steps", type=int, default=600, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before the clock starts")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the data config's (64)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side; the best is kept")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (default 1: see bench/README.md; 0 = torch's default)")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")  # Lightning's "no val loader"/"few workers" notes
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # "GPU available: False", ...
    if args.threads:
        torch.set_num_threads(args.threads)

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        setup = make_setup(args, Path(tmp))
    runs: dict[str, list[Result]] = {"pipeline": [], "bare": []}
    for _ in range(args.repeats):  # alternating, so slow phases of a shared machine hit both
        runs["pipeline"].append(run_pipeline(setup, args.warmup, args.steps))
        runs["bare"].append(run_bare(setup, args.warmup, args.steps))
    wall = {k: min(r.seconds for r in v) for k, v in runs.items()}
    cpu = {k: min(r.cpu for r in v) for k, v in runs.items()}

    print(f"{args.data} / {setup.cfg.model.name}, batch {setup.cfg.data.batch_size}, {args.steps} timed steps "
          f"(+{args.warmup} warm-up), best of {args.repeats}, torch threads {torch.get_num_threads()}, "
          f"load avg {os.getloadavg()[0]:.1f}, {time.perf_counter() - began:.0f} s in all")
    print(f"{'':10} {'samples/s':>10} {'steps/s':>9} {'ms/step':>8} {'CPU ms/step':>12} {'final loss':>11}")
    for name, results in runs.items():
        r = results[0]
        print(f"{name:10} {r.samples / wall[name]:10.0f} {r.steps / wall[name]:9.1f} "
              f"{1000 * wall[name] / r.steps:8.2f} {1000 * cpu[name] / r.steps:12.2f} {r.final_loss:11.4f}")
    print(f"ratio by CPU time (pipeline/bare): {cpu['bare'] / cpu['pipeline']:.2f}")
    print(f"ratio (pipeline/bare): {wall['bare'] / wall['pipeline']:.2f}")


if __name__ == "__main__":
    main()
