"""Property tests for the pure split functions."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.splits import (
    fold_seed,
    load_splits,
    make_splits,
    save_splits,
    stratified_folds,
    stratified_split,
)
from pipeline.errors import ConfigError, DataError


@st.composite
def labelings(draw):
    n_classes = draw(st.integers(2, 6))
    counts = draw(st.lists(st.integers(12, 60), min_size=n_classes, max_size=n_classes))
    labels = np.repeat(np.arange(n_classes), counts)
    order = np.random.default_rng(draw(st.integers(0, 1000))).permutation(len(labels))
    return labels[order]


fractions = st.sampled_from([(0.1, 0.1), (0.15, 0.15), (0.2, 0.1), (0.0, 0.25), (0.25, 0.0)])


@settings(max_examples=60, deadline=None)
@given(labels=labelings(), fr=fractions, k=st.integers(2, 6), seed=st.integers(0, 2**31))
def test_split_properties(labels, fr, k, seed):
    val_f, test_f = fr
    s = make_splits(labels, val_fraction=val_f, test_fraction=test_f, folds=k, seed=seed)
    n = len(labels)
    # train/val/test partition the dataset
    everything = np.concatenate([s.train, s.val, s.test])
    assert sorted(everything.tolist()) == list(range(n))
    # each part is stratified: class counts within one of the proportional count
    counts = np.bincount(labels)
    for part, frac in ((s.test, test_f), (s.val, val_f)):
        got = np.bincount(labels[part], minlength=len(counts))
        assert np.all(np.abs(got - counts * frac) <= 1.0 + 1e-9)
    # folds partition train+val, never touch test, and are stratified within one sample
    trainval = np.sort(np.concatenate([s.train, s.val]))
    assert sorted(np.concatenate(s.folds).tolist()) == trainval.tolist()
    assert not set(np.concatenate(s.folds).tolist()) & set(s.test.tolist())
    tv_counts = np.bincount(labels[trainval], minlength=len(counts))
    for fold in s.folds:
        got = np.bincount(labels[fold], minlength=len(counts))
        assert np.all(np.abs(got - tv_counts / k) <= 1.0)
    # fold i's training set is everything else in train+val
    tr, va = s.fold(0)
    assert not set(tr.tolist()) & set(va.tolist())
    assert len(tr) + len(va) == len(trainval)


@settings(max_examples=25, deadline=None)
@given(labels=labelings(), seed=st.integers(0, 2**31))
def test_same_seed_same_split_other_seed_differs(labels, seed):
    a = make_splits(labels, val_fraction=0.15, test_fraction=0.15, folds=3, seed=seed)
    b = make_splits(labels, val_fraction=0.15, test_fraction=0.15, folds=3, seed=seed)
    c = make_splits(labels, val_fraction=0.15, test_fraction=0.15, folds=3, seed=seed + 1)
    assert len(a.folds) == 3
    for x, y in zip((a.train, a.val, a.test, *a.folds), (b.train, b.val, b.test, *b.folds), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.test, c.test)


def test_fold_class_balance_on_uneven_counts():
    labels = np.array([0] * 23 + [1] * 7 + [2] * 11)
    folds = stratified_folds(labels, np.arange(len(labels)), k=5, seed=3)
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1  # balanced overall, not just per class
    for cls, n in ((0, 23), (1, 7), (2, 11)):
        per_fold = [int((labels[f] == cls).sum()) for f in folds]
        assert set(per_fold) <= {n // 5, -(-n // 5)}


@pytest.mark.parametrize("val,test", [(-0.1, 0.1), (0.5, 0.5), (0.1, 1.0)])
def test_bad_fractions_name_the_key(val, test):
    with pytest.raises(ConfigError, match="data.split"):
        stratified_split(np.zeros(10, dtype=int), val_fraction=val, test_fraction=test, seed=0)


def test_too_many_folds_for_a_class():
    labels = np.array([0] * 20 + [1] * 3)
    with pytest.raises(ConfigError, match="data.split.folds=5.*class 1"):
        stratified_folds(labels, np.arange(len(labels)), k=5, seed=0)


def test_save_load_roundtrip_and_param_check(tmp_path):
    labels = np.repeat(np.arange(3), 30)
    s = make_splits(labels, val_fraction=0.2, test_fraction=0.2, folds=4, seed=7)
    save_splits(tmp_path, s, labels)
    loaded = load_splits(tmp_path, expect={"seed": 7, "folds": 4})
    np.testing.assert_array_equal(loaded.test, s.test)
    assert len(loaded.folds) == 4
    with pytest.raises(DataError, match="seed: split has 7, config asks 8"):
        load_splits(tmp_path, expect={"seed": 8})
    with pytest.raises(DataError, match="No split found"):
        load_splits(tmp_path / "missing")


def _files_sha256(folder):
    h = hashlib.sha256()
    for name in ("train.npy", "val.npy", "test.npy", "folds.npz", "split.json"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def _uneven_labels():
    labels = np.repeat(np.arange(4), [30, 25, 40, 33])
    return labels[np.random.default_rng(0).permutation(len(labels))]


def test_one_repetition_is_byte_identical_to_plain_k_fold(tmp_path):
    # The digest of these files as written before cv.repeats existed (commit 9179ec7): a split
    # of one repetition, the default, must not change a byte (DVC hashes, split_sha256 tags).
    labels = _uneven_labels()
    for kwargs in ({}, {"repeats": 1}):
        s = make_splits(labels, val_fraction=0.15, test_fraction=0.15, folds=5, seed=42, **kwargs)
        save_splits(tmp_path / "s", s, labels)
        assert _files_sha256(tmp_path / "s") == "d056d1e15523c2b37bcdb2c59014ec80c1ba8667e172796dc1f537eab718f2c3"
        assert "repeats" not in json.loads((tmp_path / "s" / "split.json").read_text())["params"]


@settings(max_examples=25, deadline=None)
@given(labels=labelings(), k=st.integers(2, 5), r=st.integers(2, 4), seed=st.integers(0, 2**31))
def test_repeated_folds_properties(labels, k, r, seed):
    s = make_splits(labels, val_fraction=0.15, test_fraction=0.15, folds=k, seed=seed, repeats=r)
    plain = make_splits(labels, val_fraction=0.15, test_fraction=0.15, folds=k, seed=seed)
    assert len(s.folds) == r * k and s.repeats == r and s.params["repeats"] == r
    trainval = np.sort(np.concatenate([s.train, s.val]))
    # Each repetition partitions train+val on its own; the first is the plain k-fold split.
    for rep in range(r):
        block = s.folds[rep * k:(rep + 1) * k]
        assert sorted(np.concatenate(block).tolist()) == trainval.tolist()
    for x, y in zip(s.folds[:k], plain.folds, strict=True):
        np.testing.assert_array_equal(x, y)
    # Other repetitions deal differently (their own seed) ...
    assert any(not np.array_equal(s.folds[i], s.folds[k + i]) for i in range(k))
    # ... and fold i trains on the other folds of ITS repetition only.
    for i in range(r * k):
        train, val = s.fold(i)
        rep = i // k
        others = [s.folds[j] for j in range(rep * k, rep * k + k) if j != i]
        np.testing.assert_array_equal(train, np.sort(np.concatenate(others)))
        np.testing.assert_array_equal(val, s.folds[i])
        assert len(train) + len(val) == len(trainval)


def test_repetition_seeds_are_distinct_and_keep_the_plain_seed():
    assert fold_seed(42, 0) == 43  # the plain k-fold's seed, as before repetitions
    seeds = [fold_seed(42, r) for r in range(10)] + [fold_seed(43, r) for r in range(1, 10)]
    assert len(set(seeds)) == len(seeds)
    assert fold_seed(42, 3) == fold_seed(42, 3)


def test_repeated_save_load_roundtrip_and_check(tmp_path):
    labels = _uneven_labels()
    s = make_splits(labels, val_fraction=0.2, test_fraction=0.2, folds=2, seed=7, repeats=5)
    save_splits(tmp_path, s, labels)
    summary = json.loads((tmp_path / "split.json").read_text())
    assert [(f["repetition"], f["fold"]) for f in summary["folds"]] == [(r, i) for r in range(5) for i in range(2)]
    loaded = load_splits(tmp_path, expect={"folds": 2, "repeats": 5})
    assert len(loaded.folds) == 10 and loaded.repeats == 5
    for x, y in zip(loaded.folds, s.folds, strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(DataError, match="repeats: split has 5, config asks 1"):
        load_splits(tmp_path, expect={"repeats": 1})
    with pytest.raises(ConfigError, match="fold=10 is out of range.*10 folds"):
        loaded.fold(10)
    with pytest.raises(ConfigError, match="cv.repeats=0"):
        make_splits(labels, val_fraction=0.2, test_fraction=0.2, folds=2, seed=7, repeats=0)
    # A split made without repetitions satisfies repeats=1, not more.
    plain = tmp_path / "plain"
    save_splits(plain, make_splits(labels, val_fraction=0.2, test_fraction=0.2, folds=2, seed=7), labels)
    assert load_splits(plain, expect={"folds": 2, "repeats": 1}).repeats == 1
    with pytest.raises(DataError, match="repeats: split has 1, config asks 5"):
        load_splits(plain, expect={"repeats": 5})


@pytest.mark.integration
@pytest.mark.slow
def test_dvc_split_stage_follows_cv_repeats(tmp_path):
    """The real `dvc repro split`: cv.repeats is one of its params, a change re-runs it with
    r x k folds, and going back to 1 gives the very same output as before (same md5)."""
    import subprocess

    import yaml

    from procs import BIN, git_project, project_env

    git_project(tmp_path)

    def run(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=tmp_path, env=project_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def split_md5() -> str:
        lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
        return next(o["md5"] for o in lock["stages"]["split"]["outs"])

    def set_repeats(r: int) -> None:
        params = yaml.safe_load((tmp_path / "params.yaml").read_text())
        params["cv"]["repeats"] = r
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    dvc = str(BIN / "dvc")
    run(dvc, "repro", "split")
    plain = split_md5()
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    assert lock["stages"]["split"]["params"]["params.yaml"]["cv.repeats"] == 1

    set_repeats(2)
    assert "cv.repeats" in run(dvc, "status", "split")
    assert "Running stage 'split'" in run(dvc, "repro", "split")
    splits = load_splits(tmp_path / "data" / "splits" / "digits")
    assert splits.repeats == 2 and len(splits.folds) == 2 * splits.params["folds"]
    assert split_md5() != plain

    set_repeats(1)
    run(dvc, "repro", "split")
    assert split_md5() == plain
