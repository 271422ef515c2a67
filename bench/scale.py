"""Scale: training cost per image and anonymous memory on 10 k, 100 k and 1 M images.

For each size a synthetic dataset of 32x32x3 uint8 images (random pixels, 10 classes) is
written into a temporary folder in the pipeline's canonical format (`images.npy`,
`labels.npy`, `classes.json`, `manifest.json`, as `pipeline.data.store.read_raw` reads it),
a chunk at a time: 1 M images are 3.1 GB on disk and never in this process's memory.

Each size then trains in a fresh process (`--child`), so that its memory is its own, through
the pipeline's data path and model: `read_raw` (the manifest check, `data.in_memory` as
given, `auto` by default), the stratified train split, the train task's builders
(`build_datamodule`, `configured_module`, `build_trainer`) with LeNet-5 (a small CNN),
normalisation by the training split's statistics, batches of 128, CPU, no validation and no
checkpoints. After `--warmup` steps the clock runs for `--steps` steps; the child reports the
wall time per image over those steps (and the CPU time of the process, prefetch thread included,
steadier on a busy machine), the page faults they took and, at their end, its RssAnon (anonymous
resident memory: what the process holds itself, not the page cache it maps) from /proc/self/status.
The sizes alternate `--repeats` times; each keeps its best time (the run least slowed by other
work on the machine, as `overhead.py` does) and its median RssAnon.

    .venv/bin/python bench/scale.py [--sizes 10000 100000 1000000] [--steps 300] [--repeats 3]

Last line: `scale: time/image 1M/10k X.XX, RssAnon 1M/10k Y.YY` (largest size over smallest).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SHAPE = (32, 32, 3)
CLASSES = [f"class{i}" for i in range(10)]
CHUNK = 50_000  # images generated and written at a time (150 MB)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_dataset(folder: Path, n: int, seed: int = 0) -> None:
    """`n` random images in the canonical format, written `CHUNK` images at a time."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, *SHAPE))
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        images[start:stop] = rng.integers(0, 256, size=(stop - start, *SHAPE), dtype=np.uint8)
        images.flush()
    del images
    labels = rng.integers(0, len(CLASSES), size=n).astype(np.int64)
    np.save(folder / "labels.npy", labels, allow_pickle=False)
    (folder / "classes.json").write_text(json.dumps(CLASSES, indent=2) + "\n")
    files = {}
    for name, shape, dtype in (("images.npy", [n, *SHAPE], "uint8"), ("labels.npy", [n], "int64")):
        files[name] = {"sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size, "shape": shape,
                       "dtype": dtype}
    files["classes.json"] = {"sha256": _sha256(folder / "classes.json"), "bytes": (folder / "classes.json").stat().st_size}
    counts = np.bincount(labels, minlength=len(CLASSES))
    manifest = {"format_version": 1, "dataset": "synthetic", "num_samples": n, "image_shape": list(SHAPE),
                "num_classes": len(CLASSES), "classes": CLASSES,
                "class_counts": {c: int(k) for c, k in zip(CLASSES, counts, strict=True)}, "files": files,
                "source": {"kind": "bench/scale.py", "seed": seed}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(folder: Path, in_memory: str, steps: int, warmup: int, batch_size: int) -> dict:
    """Train on `folder` through the pipeline's data path; the figures of the timed steps."""
    started = time.perf_counter()
    import torch
    from lightning.pytorch.callbacks import Callback

    from pipeline.config import compose
    from pipeline.data.splits import stratified_split
    from pipeline.data.store import read_raw
    from pipeline.tasks.train import configured_module
    from pipeline.training.builders import build_datamodule, build_trainer

    setting = {"true": True, "false": False}.get(in_memory, in_memory)
    cfg = compose(["model=lenet5", "scheduler=none", f"data.batch_size={batch_size}", f"data.in_memory={in_memory}",
                   "data.channels=3", "data.image_size=32", "data.num_classes=10"], conf=CONF_DIR)
    imported = time.perf_counter()
    raw = read_raw(folder, in_memory=setting)
    loaded = time.perf_counter()
    split = cfg.data.split
    train_idx, _, _ = stratified_split(raw.labels, val_fraction=split.val_fraction,
                                       test_fraction=split.test_fraction, seed=split.seed)
    torch.manual_seed(cfg.seed)
    dm = build_datamodule(raw.images, raw.labels, cfg.data, train_idx=train_idx, val_idx=train_idx[:0], seed=cfg.seed)
    module = configured_module(cfg, dm, num_classes=len(raw.classes))  # reads the training split's statistics
    ready = time.perf_counter()

    class Clock(Callback):
        start = stop = cpu = 0.0
        rss_anon = rss_file = 0
        faults = (0, 0)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == warmup:
                self.start, self.cpu = time.perf_counter(), time.process_time()
                usage = resource.getrusage(resource.RUSAGE_SELF)
                self.faults = (usage.ru_minflt, usage.ru_majflt)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == warmup + steps:
                self.stop, self.cpu = time.perf_counter(), time.process_time() - self.cpu
                usage = resource.getrusage(resource.RUSAGE_SELF)
                self.faults = (usage.ru_minflt - self.faults[0], usage.ru_majflt - self.faults[1])
                self.rss_anon, self.rss_file = _status("RssAnon"), _status("RssFile")

    clock = Clock()
    with tempfile.TemporaryDirectory() as root:
        trainer = build_trainer(cfg.trainer, [clock], root_dir=root, max_steps=warmup + steps, max_epochs=-1,
                                accelerator="cpu", devices=1, enable_progress_bar=False, enable_checkpointing=False,
                                limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
    assert clock.stop > clock.start > 0.0
    return {"n": len(raw.labels), "in_memory": not isinstance(raw.images, np.memmap),
            "s_per_image": (clock.stop - clock.start) / (steps * batch_size),
            "cpu_s_per_image": clock.cpu / (steps * batch_size), "minor_faults": clock.faults[0],
            "major_faults": clock.faults[1], "rss_anon": clock.rss_anon,
            "rss_file": clock.rss_file, "import_s": imported - started, "read_raw_s": loaded - imported,
            "setup_s": ready - loaded}


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=300, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before the clock starts")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each size, alternating; the best is kept")
    parser.add_argument("--in-memory", default="auto", choices=["auto", "true", "false"],
                        help="data.in_memory for every size (default auto: the pipeline chooses by size)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--dir", type=Path, default=None, help="where the datasets go (default: a temporary folder)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child is not None:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args.in_memory, args.steps, args.warmup, args.batch_size)), flush=True)
        return

    sizes = sorted(args.sizes)
    base = Path(tempfile.mkdtemp(prefix="scale-", dir=args.dir))
    try:
        for n in sizes:
            start = time.perf_counter()
            write_dataset(base / _label(n), n)
            size = (base / _label(n) / "images.npy").stat().st_size
            print(f"wrote {_label(n)}: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
        runs: dict[int, list[dict]] = {n: [] for n in sizes}
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        for r in range(args.repeats):
            for n in sizes:
                cmd = [sys.executable, __file__, "--child", str(base / _label(n)), "--in-memory", args.in_memory,
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                       "--threads", str(args.threads)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    sys.exit(f"the {_label(n)} run failed:\n{out.stderr[-3000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs[n].append(result)
                print(f"run {r + 1} {_label(n)}: {result['s_per_image'] * 1e6:.1f} us/image "
                      f"(CPU {result['cpu_s_per_image'] * 1e6:.1f}), page faults {result['minor_faults']} minor "
                      f"{result['major_faults']} major, RssAnon "
                      f"{result['rss_anon'] / 1e6:.0f} MB, read_raw {result['read_raw_s']:.1f} s, "
                      f"setup {result['setup_s']:.1f} s, load average {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"\n{'images':>8} {'mode':>14} {'us/image':>9} {'median':>7} {'CPU us':>7} {'RssAnon MB':>11} "
          f"{'RssFile MB':>11} {'major faults':>13} {'read_raw s':>11} {'setup s':>8}")
    best, anon = {}, {}
    for n in sizes:
        rs = runs[n]
        best[n] = min(r["s_per_image"] for r in rs)
        anon[n] = statistics.median(r["rss_anon"] for r in rs)
        mode = "in memory" if rs[0]["in_memory"] else "memory-mapped"
        print(f"{_label(n):>8} {mode:>14} {best[n] * 1e6:>9.1f} "
              f"{statistics.median(r['s_per_image'] for r in rs) * 1e6:>7.1f} "
              f"{min(r['cpu_s_per_image'] for r in rs) * 1e6:>7.1f} {anon[n] / 1e6:>11.0f} "
              f"{statistics.median(r['rss_file'] for r in rs) / 1e6:>11.0f} {max(r['major_faults'] for r in rs):>13} "
              f"{statistics.median(r['read_raw_s'] for r in rs):>11.2f} {statistics.median(r['setup_s'] for r in rs):>8.1f}")
    small, large = sizes[0], sizes[-1]
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"scale: time/image {_label(large)}/{_label(small)} {best[large] / best[small]:.2f}, "
          f"RssAnon {_label(large)}/{_label(small)} {anon[large] / anon[small]:.2f}")


if __name__ == "__main__":
    main()
