"""The index sets of nested cross-validation: pure and seeded, like the rest of `pipeline.data`.

Outer fold i holds out `splits.folds[i]`, exactly the fold plain cross-validation validates
on. Everything chosen for that fold is made from the other outer folds only (its "training
part"): the inner folds its sweep picks a configuration on, and the train and validation
parts the chosen configuration is then refitted on. So the held-out fold reaches neither the
sweep nor the refit, and scores the refitted model once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.splits import Splits, stratified_folds, stratified_split
from pipeline.errors import ConfigError


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays
class OuterFold:
    """One outer fold: what is held out, and the two splits made from the rest."""

    fold: int
    held_out: np.ndarray  # outer fold i: scored once, by the refitted model
    inner: Splits         # the sweep's split: `inner_folds` stratified folds over the training part
    refit: Splits         # the refit's train and validation parts (the validation part picks its
    #                       best epoch and stops it early, as the train stage's val split does)


def derived_seed(seed: int, fold: int, purpose: int) -> int:
    """A seed of its own for each outer fold and use, reproducible from the split's seed."""
    return int(np.random.SeedSequence([seed, fold, purpose]).generate_state(1)[0])


def outer_fold(splits: Splits, labels: np.ndarray, *, fold: int, inner_folds: int,
               val_fraction: float) -> OuterFold:
    """Outer fold `fold` of `splits`: its held-out fold, the inner split (stratified folds over
    the other outer folds, seeded from the split's seed and the fold) and the refit split
    (`val_fraction` of the same training part, stratified, validates). The test split stays
    the test split in both: neither trains on it nor chooses by it."""
    labels = np.asarray(labels)
    train_part, held_out = splits.fold(fold)
    classes, counts = np.unique(labels[train_part], return_counts=True)
    if counts.min() < inner_folds:
        small = int(np.argmin(counts))
        raise ConfigError(f"cv.inner_folds={inner_folds} is more than the {int(counts[small])} samples of class "
                          f"{int(classes[small])} in outer fold {fold}'s training part: lower cv.inner_folds "
                          "(or data.split.folds), or gather more data.")
    if val_fraction <= 0:
        raise ConfigError("nested cross-validation refits each outer fold's choice with a validation part of "
                          "data.split.val_fraction of its training part, but data.split.val_fraction=0: set it "
                          "above 0 (e.g. 0.15).")
    seed = int(splits.params["seed"])
    folds = stratified_folds(labels, train_part, k=inner_folds, seed=derived_seed(seed, fold, 1))
    inner_params = {**splits.params, "folds": inner_folds, "outer_fold": fold}
    inner = Splits(np.sort(np.concatenate(folds[1:])), folds[0], splits.test, folds, inner_params)
    local_train, local_val, _ = stratified_split(labels[train_part], val_fraction=val_fraction, test_fraction=0.0,
                                                 seed=derived_seed(seed, fold, 2))
    refit = Splits(train_part[local_train], train_part[local_val], splits.test, (),
                   {**splits.params, "outer_fold": fold})
    return OuterFold(fold, held_out, inner, refit)
