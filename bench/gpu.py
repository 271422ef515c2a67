"""The GPU path against a bare PyTorch loop: CIFAR-10-shaped ResNet-20 training, images/s and time.

A synthetic CIFAR-10-shaped dataset (32x32x3 uint8, 10 classes, random; `--images` of them) is
written in the pipeline's own format into a temporary project and split as the split stage
splits it. Then, for the same number of epochs, alternating for `--repeats` rounds:

- **pipeline**: the real train task (`pipeline.tasks.train.train`) with
  the choices of `experiment=resnet20_cifar10` (ResNet-20, SGD momentum at 0.1, weight decay
  1e-4, flip + 4-px crop augmentation) but `scheduler=none`, no early stopping, tracking off, and the switches given here
  (`--precision`, `--channels-last`, `--compile`, `--device-cache`). Timed: `time/train_s`, its
  `Trainer.fit` (training and the validation pass of every epoch).
- **bare**: a plain loop over the same network (`build_network`, the same input statistics),
  optimizer (`build_optimizer`), augmentation (`BatchAugment`), batch size, precision
  (`torch.autocast`, a `GradScaler` for 16-mixed), memory format and `torch.compile`, with the
  images on the device as uint8 (the fastest way a hand-written loop feeds a GPU), and the same
  validation pass every epoch. Timed from its first step to the end of its last validation.

Prints images/s (training images per second of that time), the time to the epochs and the ratio
pipeline/bare; the last line is the headline. Without a CUDA device it says so and exits 0
(`--allow-cpu` runs it on the CPU anyway, to check the script on a small `--images`).

    .venv/bin/python bench/gpu.py                                  # 32-true, 10 epochs of 50,000
    .venv/bin/python bench/gpu.py --precision bf16-mixed --channels-last --compile
    .venv/bin/python bench/gpu.py --allow-cpu --images 2000 --epochs 1 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import write_dataset  # noqa: E402  (this folder's synthetic dataset writer)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DATASET = "cifar10"  # the config's shape and class count; the images are synthetic


def make_project(root: Path, images: int) -> None:
    """A synthetic CIFAR-10-shaped `data/raw/cifar10/` under `root`."""
    raw = root / "data" / "raw" / DATASET
    write_dataset(raw, images)
    manifest = json.loads((raw / "manifest.json").read_text())
    manifest["dataset"] = DATASET  # what the train task checks the data against
    (raw / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def config(root: Path, args: argparse.Namespace):
    from omegaconf import open_dict

    from pipeline.config import compose

    # conf/experiment/resnet20_cifar10.yaml's choices, without its epoch-sized schedule (the bare loop has none).
    overrides = ["data=cifar10", "model=resnet20", "optimizer=momentum", "optimizer.lr=0.1",
                 "optimizer.weight_decay=0.0001", "scheduler=none", "regularizer=[augment_cifar]",
                 "regularizer.early_stopping.enabled=false",
                 f"trainer.max_epochs={args.epochs}", f"trainer.precision={args.precision}",
                 f"trainer.channels_last={str(args.channels_last).lower()}",
                 f"trainer.compile={str(args.compile).lower()}", f"data.device_cache={args.device_cache}",
                 f"data.batch_size={args.batch_size}", "trainer.enable_progress_bar=false", "tracking.enabled=false",
                 f"trainer.accelerator={'gpu' if torch.cuda.is_available() else 'cpu'}", "trainer.devices=1",
                 "trainer.deterministic=false"]
    cfg = compose(overrides, conf=CONF_DIR)
    with open_dict(cfg):
        cfg.paths.root = str(root)
        cfg.paths.out_dir = str(root / "out")
    return cfg


def run_pipeline(cfg) -> float:
    from pipeline.tasks.train import train

    return float(train(cfg, figures=False)["time/train_s"])


def run_bare(cfg, device: torch.device) -> float:
    from pipeline.data.augment import AugmentConfig, BatchAugment
    from pipeline.data.batches import channel_stats
    from pipeline.data.splits import load_splits
    from pipeline.data.store import read_raw
    from pipeline.layout import Layout
    from pipeline.training.network import build_network
    from pipeline.training.optim import build_optimizer
    from pipeline.validation import model_args, prepare

    cfg = prepare(cfg)
    layout = Layout.from_cfg(cfg)
    raw, splits = read_raw(layout.raw, in_memory=True), load_splits(layout.splits)
    mean, std = channel_stats(raw.images, splits.train)
    arch = model_args(cfg, num_classes=len(raw.classes))
    net = build_network(arch.pop("name"), arch, mean=mean, std=std, resize=cfg.data.resize).to(device)
    memory = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    net = net.to(memory_format=memory)
    if cfg.trainer.compile:
        net.compile()
    opt_cfg = dict(cfg.optimizer)
    optimizer = build_optimizer(net.parameters(), opt_cfg.pop("name"), **opt_cfg)
    augment = BatchAugment(AugmentConfig.from_dict(dict(cfg.regularizer.augment)), seed=cfg.seed)
    precision = str(cfg.trainer.precision)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    images = torch.from_numpy(np.ascontiguousarray(raw.images.transpose(0, 3, 1, 2))).to(device)
    labels = torch.from_numpy(raw.labels.astype(np.int64)).to(device)
    train_idx = torch.from_numpy(splits.train).to(device)
    val_idx = torch.from_numpy(splits.val).to(device)
    size, g = int(cfg.data.batch_size), torch.Generator().manual_seed(cfg.seed)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def batch(rows: torch.Tensor) -> torch.Tensor:
        return images[rows].float().div_(255.0)

    _sync(device)
    start = time.perf_counter()
    for _ in range(int(cfg.trainer.max_epochs)):
        net.train()
        order = train_idx[torch.randperm(len(train_idx), generator=g).to(device)]
        for s in range(0, len(order), size):
            rows = order[s : s + size]
            x = augment(batch(rows)).contiguous(memory_format=memory)
            with autocast():
                loss = torch.nn.functional.cross_entropy(net(x), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        net.eval()
        hits = torch.zeros((), device=device)
        with torch.inference_mode(), autocast():
            for s in range(0, len(val_idx), int(cfg.data.eval_batch_size)):
                rows = val_idx[s : s + int(cfg.data.eval_batch_size)]
                hits += (net(batch(rows).contiguous(memory_format=memory)).argmax(1) == labels[rows]).sum()
        hits.item()  # the epoch's figure, as the pipeline logs it
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000, help="synthetic images (default: CIFAR-10's 50,000)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--precision", default="bf16-mixed", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--device-cache", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--repeats", type=int, default=2, help="rounds of (pipeline, bare); each side keeps its best")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no CUDA device")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(f"gpu: no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False): nothing to "
              "measure. Run this on a machine with an NVIDIA GPU (--allow-cpu checks the script on the CPU).")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        root = Path(tmp)
        make_project(root, args.images)
        cfg = config(root, args)
        from pipeline.tasks.data import split

        sizes = split(cfg)
        times: dict[str, list[float]] = {"pipeline": [], "bare": []}
        for _ in range(args.repeats):
            times["pipeline"].append(run_pipeline(cfg.copy()))
            times["bare"].append(run_bare(cfg.copy(), device))
    seen = sizes["train"] * args.epochs
    switches = (f"{args.precision}, channels_last={args.channels_last}, compile={args.compile}, "
                f"device_cache={args.device_cache}, batch {args.batch_size}")
    print(f"resnet20 on {sizes['train']:,} synthetic 32x32x3 training images, {args.epochs} epochs, {name}: {switches}")
    best = {side: min(t) for side, t in times.items()}
    for side, t in best.items():
        print(f"{side:<9} {seen / t:>10,.0f} images/s   {t:8.2f} s to {args.epochs} epochs   "
              f"(runs: {', '.join(f'{v:.2f}' for v in times[side])} s)")
    ratio = best["pipeline"] / best["bare"]
    print(f"gpu: pipeline {seen / best['pipeline']:,.0f} images/s, bare {seen / best['bare']:,.0f} images/s, "
          f"time to {args.epochs} epochs pipeline/bare {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
