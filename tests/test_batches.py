"""Batches by index: rank sharding (every rank runs as many batches, since DDP's collectives wait
for all ranks, and across ranks every sample is seen once an epoch, up to the padding); a batch
reads only its own images; prefetching in a thread changes no batch and leaves no thread behind;
memory-mapped and in-memory images train alike."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback

from pipeline.data.batches import IGNORE_INDEX, TensorBatches, to_batch
from pipeline.data.prefetch import THREAD_NAME


def _ranks(n: int, batch_size: int, world: int, **kw) -> list[TensorBatches]:
    """One TensorBatches per rank over n samples whose label is their index."""
    images = np.zeros((n, 1, 1, 1), dtype=np.uint8)
    return [TensorBatches(images, np.arange(n), batch_size=batch_size, rank=r, world_size=world, **kw)
            for r in range(world)]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 400), batch_size=st.integers(1, 70), world=st.integers(1, 9), shuffle=st.booleans(),
       seed=st.integers(0, 2**20), epoch=st.integers(0, 5))
def test_every_rank_runs_as_many_batches_and_sees_its_share(n, batch_size, world, shuffle, seed, epoch):
    per_rank = math.ceil(n / world)
    for mark_padding in (False, True):
        ranks = _ranks(n, batch_size, world, shuffle=shuffle, seed=seed, mark_padding=mark_padding)
        seen: Counter[int] = Counter()
        for batches in ranks:
            batches.set_epoch(epoch)
            sizes = [len(y) for _, y in batches]
            batches.set_epoch(epoch)  # iterating advanced it
            seen.update(torch.cat([y for _, y in batches]).tolist() if sizes else [])
            # The same batches, of the same sizes, on every rank; len() agrees with iteration.
            assert len(sizes) == len(batches) == math.ceil(per_rank / batch_size)
            assert sizes == [min(batch_size, per_rank - s) for s in range(0, per_rank, batch_size)]
        padding = per_rank * world - n
        assert padding < world
        if mark_padding:  # each sample once; the duplicates carry the label evaluation ignores
            assert seen == Counter({**dict.fromkeys(range(n), 1), **({IGNORE_INDEX: padding} if padding else {})})
        else:  # each sample at least once; the padding repeats the shared order's first samples
            assert set(seen) == set(range(n)) and sum(seen.values()) == n + padding
            assert sum(count - 1 for count in seen.values()) == padding


def test_shuffle_is_shared_by_the_ranks_and_changes_with_the_epoch():
    ranks = _ranks(10, 4, 2, shuffle=True, seed=3)
    first, second = ([torch.cat([y for _, y in b]).tolist() for b in ranks] for _ in range(2))
    assert first != second  # each pass is the next epoch's order
    assert sorted(first[0] + first[1]) == list(range(10))


def test_validation_leaves_the_padding_out(tmp_path):
    """A rank's padded validation shard, run by a single process, scores its real samples only."""
    import lightning as L

    from pipeline.training.module import Classifier

    images, labels = np.random.default_rng(0).integers(0, 256, (7, 4, 4, 1), dtype=np.uint8), np.arange(7) % 3
    module = Classifier(arch="mlp", arch_kwargs=dict(in_channels=1, num_classes=3, image_size=4, hidden_sizes=[8]),
                        mean=[0.5], std=[0.25], resize=None, optimizer={"name": "sgd", "lr": 0.1},
                        scheduler={"name": "none"}).eval()
    # Rank 3 of 4 holds sample 3 and a duplicate of sample 0 (7 samples padded to 8), in two
    # batches of one: the second is all padding.
    shard = TensorBatches(images, labels, batch_size=1, shuffle=False, rank=3, world_size=4, mark_padding=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    (metrics,) = trainer.validate(module, dataloaders=shard)
    with torch.inference_mode():
        logits = module(to_batch(images[3:4]))
    assert metrics["val/acc"] == float(logits.argmax(dim=1).item() == labels[3])
    assert metrics["val/loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor(labels[3:4])).item())


# ---------------------------------------------------------------------------- reading, prefetching

def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]


class _Rows(np.ndarray):
    """An image array that records the rows each read asks for (what a memory map would fault in)."""

    reads: list[np.ndarray]

    def __getitem__(self, key):
        if isinstance(key, np.ndarray):
            self.reads.append(key.copy())
        return np.asarray(self).__getitem__(key)


def _recording(images: np.ndarray) -> _Rows:
    rows = images.view(_Rows)
    rows.reads = []
    return rows


def test_a_batch_reads_only_its_own_images_in_file_order():
    images = np.random.default_rng(0).integers(0, 256, (50, 3, 3, 2), dtype=np.uint8)
    train = np.random.default_rng(1).permutation(50)[:30]
    recorded = _recording(images)
    batches = TensorBatches(recorded, np.arange(50), train, batch_size=8, shuffle=True, seed=5)
    got = list(batches)
    assert [len(r) for r in recorded.reads] == [8, 8, 8, 6]  # one read per batch, of its rows only
    assert all((np.diff(r) > 0).all() for r in recorded.reads)  # ascending: front to back in the file
    assert sorted(np.concatenate(recorded.reads).tolist()) == sorted(train.tolist())  # never a validation row
    for (x, y), read in zip(got, recorded.reads, strict=True):  # shuffled back: image i has label i
        assert sorted(y.tolist()) == read.tolist()
        assert torch.equal(x, to_batch(images[y.numpy()]))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 90), batch_size=st.integers(1, 20), world=st.integers(1, 3), shuffle=st.booleans(),
       prefetch=st.integers(1, 3), epoch=st.integers(0, 3))
def test_prefetched_batches_are_the_synchronous_ones(n, batch_size, world, shuffle, prefetch, epoch):
    images = np.random.default_rng(n).integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
    for rank in range(world):
        passes = []
        for ahead in (0, prefetch):
            batches = TensorBatches(images, np.arange(n) % 7, batch_size=batch_size, shuffle=shuffle, seed=3,
                                    rank=rank, world_size=world, mark_padding=True, prefetch=ahead)
            batches.set_epoch(epoch)
            passes.append([list(batches), list(batches)])  # this epoch's and the next's
        assert len(passes[0][0]) == len(passes[1][0])
        for sync, ahead in zip(passes[0], passes[1], strict=True):
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(sync, ahead, strict=True))
    assert not _prefetch_threads()  # every pass ran to its end, and its thread with it


def test_a_pass_left_unfinished_stops_its_thread():
    images = np.zeros((40, 1, 1, 1), dtype=np.uint8)
    batches = TensorBatches(images, np.arange(40), batch_size=4, shuffle=True, prefetch=2)
    first = iter(batches)
    next(first)
    assert len(_prefetch_threads()) == 1
    second = iter(batches)
    next(second)  # a new pass (the next epoch after a batch limit) stops the one left unfinished
    assert len(_prefetch_threads()) == 1
    batches.close()
    assert not _prefetch_threads()
    del first, second


class _Failing(np.ndarray):
    """Images whose third read fails, as a read from a vanished network file system would."""

    def __getitem__(self, key):
        if isinstance(key, np.ndarray):
            self.count = getattr(self, "count", 0) + 1
            if self.count == 3:
                raise OSError("read failed")
        return np.asarray(self).__getitem__(key)


def test_an_error_making_a_batch_is_raised_where_the_batches_are_taken():
    images = np.zeros((40, 2, 2, 1), dtype=np.uint8).view(_Failing)
    batches = TensorBatches(images, np.arange(40), batch_size=4, shuffle=False, prefetch=1)
    taken = []
    with pytest.raises(OSError, match="read failed"):
        for _, y in batches:
            taken.append(y.tolist())
    assert taken == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the batches before it, in order
    assert not _prefetch_threads()


class _Stop(Callback):
    """Stops training at its third batch: by a real SIGINT to this process, or by an error."""

    def __init__(self, how: str) -> None:
        self.how = how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 2:
            assert _prefetch_threads()  # the next batches are being made meanwhile
            if self.how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the signal interrupts this
            raise RuntimeError("boom")


@pytest.mark.parametrize("how, error", [("sigint", KeyboardInterrupt), ("error", RuntimeError)])
def test_a_stopped_training_leaves_no_thread_behind(cfg_factory, tmp_path, how, error):
    from pipeline.tasks.train import configured_module
    from pipeline.training.builders import build_datamodule, build_trainer
    from pipeline.training.fit import fit

    cfg = cfg_factory(["model=mlp"])
    images = np.random.default_rng(0).integers(0, 256, (300, 8, 8, 1), dtype=np.uint8)
    dm = build_datamodule(images, np.arange(300) % 10, cfg.data, train_idx=np.arange(250),
                          val_idx=np.arange(250, 300), seed=0)
    module = configured_module(cfg, dm, num_classes=10)
    trainer = build_trainer(cfg.trainer, [_Stop(how)], root_dir=tmp_path, accelerator="cpu",
                            enable_checkpointing=False)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(error):
            fit(trainer, module, datamodule=dm)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a Ctrl+C
    assert trainer.global_step == 3
    assert not _prefetch_threads()


# ---------------------------------------------------------------------------- in memory or memory-mapped

def _steps(raw, cfg, tmp_path: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-step training losses and the final weights of a few seeded steps on `raw`."""
    import lightning as L

    from pipeline.tasks.train import configured_module
    from pipeline.training.builders import build_datamodule, build_trainer

    class Losses(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.values.append(outputs["loss"].item())

    L.seed_everything(cfg.seed, verbose=False)
    n = len(raw.labels)
    dm = build_datamodule(raw.images, raw.labels, cfg.data, train_idx=np.arange(0, n, 2), val_idx=np.arange(1, n, 2),
                          seed=cfg.seed)
    module = configured_module(cfg, dm, num_classes=len(raw.classes))
    losses = Losses()
    trainer = build_trainer(cfg.trainer, [losses], root_dir=tmp_path, accelerator="cpu", max_steps=12,
                            enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    return losses.values, {k: v.clone() for k, v in module.state_dict().items()}


def test_memory_mapped_and_in_memory_images_train_bit_for_bit_alike(cfg_factory, tmp_path):
    from pipeline.data.store import read_raw, write_raw

    # Colour images, shuffled batches over two epochs, with augmentation and normalisation.
    cfg = cfg_factory(["model=lenet5", "regularizer=augment", "data.batch_size=16", "data.channels=3"])
    rng = np.random.default_rng(0)
    write_raw(tmp_path / "raw", rng.integers(0, 256, (200, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, 200),
              ["a", "b", "c", "d"], dataset="toy")
    mapped, held = read_raw(tmp_path / "raw", in_memory=False), read_raw(tmp_path / "raw", in_memory=True)
    assert isinstance(mapped.images, np.memmap) and not isinstance(held.images, np.memmap)
    losses_mapped, weights_mapped = _steps(mapped, cfg, tmp_path / "mapped")
    losses_held, weights_held = _steps(held, cfg, tmp_path / "held")
    assert len(losses_mapped) == 12 and losses_mapped == losses_held
    assert weights_mapped.keys() == weights_held.keys()
    assert all(torch.equal(weights_mapped[k], weights_held[k]) for k in weights_mapped)
