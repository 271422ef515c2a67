"""Rank sharding of in-memory batches: every rank runs as many batches (DDP's collectives wait
for all ranks), and across ranks every sample is seen once an epoch, up to the padding."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.batches import IGNORE_INDEX, TensorBatches


def _ranks(n: int, batch_size: int, world: int, **kw) -> list[TensorBatches]:
    """One TensorBatches per rank over n samples whose label is their index."""
    images = torch.zeros(n, 1, 1, 1, dtype=torch.uint8)
    return [TensorBatches(images, torch.arange(n), batch_size=batch_size, rank=r, world_size=world, **kw)
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

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (7, 1, 4, 4), dtype=torch.uint8, generator=g), torch.arange(7) % 3
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
        logits = module(images[3:4].float() / 255.0)
    assert metrics["val/acc"] == float(logits.argmax(dim=1).item() == labels[3].item())
    assert metrics["val/loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels[3:4]).item())
