"""The data tasks: fetch a dataset into the canonical format, split it into index files."""

from __future__ import annotations

from omegaconf import DictConfig

from pipeline.data.sources import fetch as fetch_source
from pipeline.data.splits import make_splits, save_splits
from pipeline.data.store import read_raw
from pipeline.layout import Layout
from pipeline.validation import prepare


def fetch(cfg: DictConfig) -> dict:
    """Write `data/raw/<dataset>/` (arrays + manifest); returns the manifest."""
    cfg = prepare(cfg, trains=False, models=False)
    layout = Layout.from_cfg(cfg)
    d = cfg.data
    # data.num_workers: the image-folder fetch's decoding threads (0 counts as 1); the output
    # does not depend on it, so it is no parameter of the fetch stage.
    return fetch_source(d.name, out_dir=layout.raw, download_dir=layout.downloads, download=d.download,
                        path=d.path, image_size=d.image_size, channels=d.channels, workers=d.num_workers)


def split(cfg: DictConfig) -> dict:
    """Write `data/splits/<dataset>/` (train/val/test and cv.repeats x k folds); returns split sizes."""
    cfg = prepare(cfg, trains=False, models=False)
    layout = Layout.from_cfg(cfg)
    raw = read_raw(layout.raw, in_memory=False)  # the labels are all it needs
    s = cfg.data.split
    splits = make_splits(raw.labels, val_fraction=s.val_fraction, test_fraction=s.test_fraction,
                         folds=s.folds, seed=s.seed, repeats=cfg.cv.repeats)
    save_splits(layout.splits, splits, raw.labels)
    return {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test), "folds": len(splits.folds)}


def ensure_data(cfg: DictConfig) -> None:
    """Fetch and split if their outputs are missing (ad-hoc CLI runs outside `dvc repro`)."""
    layout = Layout.from_cfg(prepare(cfg, trains=False, models=False))
    if not (layout.raw / "manifest.json").exists():
        fetch(cfg)
    if not (layout.splits / "split.json").exists():
        split(cfg)
