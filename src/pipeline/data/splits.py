"""Pure, seeded split functions and the index files the `split` stage writes.

Everything here is a function of (labels, fractions, k, repeats, seed): no global RNG, no
I/O except in `save_splits`/`load_splits`, so property tests can hammer it.

Repeated k-fold (`cv.repeats` = r > 1) deals train+val into k folds r times, each repetition
with its own seed; the r x k folds are stored repetition-major (fold index = rep * k + i).
With r = 1 nothing about the split, its files or their bytes differs from a plain k-fold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, DataError
from pipeline.files import replacing_folder


@dataclass(frozen=True)
class Splits:
    """Index arrays into the raw dataset. `folds[i]` is fold i's validation set; with
    repetitions, fold i is fold i % k of repetition i // k."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    folds: tuple[np.ndarray, ...]
    params: dict

    @property
    def repeats(self) -> int:
        return int(self.params.get("repeats", 1))

    def fold(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) indices for fold i: val is fold i, train is every other fold of the
        same repetition."""
        if not 0 <= i < len(self.folds):
            raise ConfigError(f"fold={i} is out of range: this split has {len(self.folds)} folds (0..{len(self.folds) - 1}).")
        k = len(self.folds) // self.repeats
        start = i // k * k
        rest = [f for j, f in enumerate(self.folds[start:start + k], start) if j != i]
        return np.sort(np.concatenate(rest)), self.folds[i]


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for key, v in (("data.split.val_fraction", val_fraction), ("data.split.test_fraction", test_fraction)):
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"{key}={v} must be in [0, 1).")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"data.split.val_fraction + data.split.test_fraction = {val_fraction + test_fraction} "
            "must be < 1 so that some training data remains."
        )


def stratified_split(
    labels: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split indices into (train, val, test), each class in the same proportions.

    Per class, the test and val counts are the class size times the fraction, rounded,
    so every part's class proportions match the whole to within one sample per class.
    """
    _check_fractions(val_fraction, test_fraction)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * val_fraction))
        n_val = min(n_val, len(idx) - n_test)
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test : n_test + n_val])
        parts[0].append(idx[n_test + n_val :])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)  # type: ignore[return-value]


def stratified_folds(labels: np.ndarray, indices: np.ndarray, *, k: int, seed: int) -> tuple[np.ndarray, ...]:
    """Partition `indices` into k folds with every class dealt round-robin.

    Dealing each shuffled class in turn (continuing where the previous class stopped)
    gives each fold floor or ceil of n_c/k samples of class c, and balanced fold sizes.
    """
    if k < 2:
        raise ConfigError(f"data.split.folds={k} must be at least 2.")
    labels = np.asarray(labels)
    indices = np.asarray(indices, dtype=np.int64)
    counts = np.bincount(labels[indices]) if len(indices) else np.array([])
    if len(indices) < k:
        raise ConfigError(f"data.split.folds={k} exceeds the {len(indices)} train+val samples.")
    if counts.size and counts[counts > 0].min() < k:
        small = int(np.flatnonzero((counts > 0) & (counts < k))[0])
        raise ConfigError(
            f"data.split.folds={k} is more than the {int(counts[small])} train+val samples of class {small}; "
            "lower data.split.folds or gather more data."
        )
    rng = np.random.default_rng(seed)
    folds: list[list[np.ndarray]] = [[] for _ in range(k)]
    offset = 0
    for cls in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == cls])
        for j in range(k):
            folds[(offset + j) % k].append(members[j::k])
        offset = (offset + len(members)) % k
    return tuple(np.sort(np.concatenate(f)).astype(np.int64) for f in folds)


def fold_seed(seed: int, repetition: int) -> int:
    """The seed dealing repetition `repetition`'s folds. Repetition 0 keeps seed + 1, the
    plain k-fold's seed (so one repetition is the split it always was); the others hash
    (seed, repetition), so no repetition's seed is another split seed's."""
    if repetition == 0:
        return seed + 1
    return int(np.random.SeedSequence([seed, repetition]).generate_state(1)[0])


def make_splits(
    labels: np.ndarray, *, val_fraction: float, test_fraction: float, folds: int, seed: int, repeats: int = 1
) -> Splits:
    """The full split: stratified train/val/test plus `repeats` x k folds over train+val."""
    if repeats < 1:
        raise ConfigError(f"cv.repeats={repeats} must be at least 1.")
    train, val, test = stratified_split(labels, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    trainval = np.sort(np.concatenate([train, val]))
    # A derived seed keeps the folds independent of the train/val draw yet reproducible.
    fold_arrays = tuple(f for r in range(repeats)
                        for f in stratified_folds(labels, trainval, k=folds, seed=fold_seed(seed, r)))
    params = {"val_fraction": val_fraction, "test_fraction": test_fraction, "folds": folds, "seed": seed,
              "num_samples": int(len(labels))}
    if repeats > 1:  # absent for one repetition: that split's files stay byte for byte as before
        params["repeats"] = repeats
    return Splits(train, val, test, fold_arrays, params)


def save_splits(out_dir: Path, splits: Splits, labels: np.ndarray) -> None:
    """Write train/val/test/fold index files and a `split.json` summary, all at once: they
    go into a new folder that replaces `out_dir` once complete (`pipeline.files`)."""
    n_classes = int(labels.max()) + 1 if len(labels) else 0

    def counts(idx: np.ndarray) -> list[int]:
        return np.bincount(labels[idx], minlength=n_classes).tolist()

    summary = {
        "params": splits.params,
        "sizes": {n: int(len(getattr(splits, n))) for n in ("train", "val", "test")},
        "class_counts": {n: counts(getattr(splits, n)) for n in ("train", "val", "test")},
        "folds": [{"size": int(len(f)), "class_counts": counts(f)} for f in splits.folds],
    }
    if splits.repeats > 1:
        k = len(splits.folds) // splits.repeats
        for i, entry in enumerate(summary["folds"]):
            entry.update(repetition=i // k, fold=i % k)
    with replacing_folder(out_dir) as tmp:
        for name in ("train", "val", "test"):
            np.save(tmp / f"{name}.npy", getattr(splits, name))
        np.savez(tmp / "folds.npz", **{f"fold_{i}": f for i, f in enumerate(splits.folds)})
        (tmp / "split.json").write_text(json.dumps(summary, indent=2) + "\n")


def load_splits(split_dir: Path, *, expect: dict | None = None) -> Splits:
    """Read what `save_splits` wrote; with `expect`, check the split was made with those params."""
    summary_path = split_dir / "split.json"
    if not summary_path.exists():
        raise DataError(f"No split found at {split_dir}: run `dvc repro split` (or `pipeline split`) first.")
    params = json.loads(summary_path.read_text())["params"]
    if expect:
        check_params(params, expect, split_dir)
    try:
        arrays = {n: np.load(split_dir / f"{n}.npy") for n in ("train", "val", "test")}
        with np.load(split_dir / "folds.npz") as z:
            folds = tuple(z[f"fold_{i}"] for i in range(params["folds"] * params.get("repeats", 1)))
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"Split files in {split_dir} are missing or corrupt ({err}); "
                        "run `dvc repro split` to remake them.") from err
    return Splits(arrays["train"], arrays["val"], arrays["test"], folds, params)


def check_params(params: dict, expect: dict, split_dir: Path) -> None:
    """DataError unless the split (of `split_dir`) was made with the `expect`ed parameters.
    A split without `repeats` has one repetition."""
    made = {"repeats": 1, **params}
    diff = {k: (made.get(k), v) for k, v in expect.items() if made.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: split has {a}, config asks {b}" for k, (a, b) in diff.items())
        raise DataError(f"The split in {split_dir} does not match the config ({detail}); "
                        "run `dvc repro split` (or `pipeline split`) to remake it.")
