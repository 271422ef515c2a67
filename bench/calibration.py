"""Calibration of the comparison tests: how often each one finds a difference that is not there.

A planted null: two designs that are the same design (the config's MLP, a few epochs) and
differ only in their training seed, cross-validated on the same folds of digits, exactly as
`pipeline compare` pairs its alternatives. Whatever separates their fold scores is seed noise,
so every "significant" verdict is a false positive; a calibrated test at alpha = 0.05 gives
one in 20. Each null draws a new split (folds) and a new pair of seeds, and is tested by
`pipeline.analysis.stats.compare_alternatives`, the code `pipeline compare` runs:

- k-fold (`--folds`, the config's 5; `--repeats` r: r x k folds, as `cv.repeats`): paired
  t, corrected resampled t, Wilcoxon;
- 5 x 2-fold (`cv.repeats=5`, 2 folds): Dietterich's 5x2cv t, and corrected and paired t
  over the same 10 folds.

Training is in this process and minimal: the pipeline's own split functions, network
(`build_network`: `Preprocess` + the registry's MLP), optimizer (`build_optimizer`) and
batches (`TensorBatches`) in a plain PyTorch loop (what `bench/overhead.py` checks against
the Lightning path), no checkpoints, no tracking. Each false-positive rate comes with a 95%
Wilson interval. The last line is the headline.

    .venv/bin/python bench/calibration.py [--nulls 60] [--epochs 3] [--folds 5] [--repeats 1] [--no-5x2]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats as sps

from pipeline.analysis.stats import compare_alternatives
from pipeline.config import compose, to_container
from pipeline.data.batches import TensorBatches, channel_stats, gather, to_batch
from pipeline.data.sources import load_source
from pipeline.data.splits import Splits, make_splits
from pipeline.training.module import build_network
from pipeline.training.optim import build_optimizer
from pipeline.validation import model_args

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
ALPHA = 0.05
# (design, test key in a compare_alternatives pair, name in the table)
ROWS = (("kfold", "t_test", "paired_t"), ("kfold", "corrected_t", "corrected_t"), ("kfold", "wilcoxon", "wilcoxon"),
        ("5x2", "five_by_two", "5x2cv"), ("5x2", "corrected_t", "corrected_t"), ("5x2", "t_test", "paired_t"))


# ----------------------------------------------------------------------------- pure counting


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (scipy's `binomtest(...).proportion_ci`)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    ci = sps.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class Rate:
    name: str
    design: str
    rejections: int
    nulls: int

    @property
    def fpr(self) -> float:
        return self.rejections / self.nulls

    @property
    def ci(self) -> tuple[float, float]:
        return wilson(self.rejections, self.nulls)

    def cell(self) -> str:
        lo, hi = self.ci
        return f"{self.fpr:.2f} [{lo:.2f}, {hi:.2f}]"


def rates(p_values: dict[tuple[str, str], Sequence[float]], alpha: float = ALPHA) -> list[Rate]:
    """Per (design, test): how many of its null comparisons had p <= alpha."""
    out = []
    for design, key, name in ROWS:
        ps = p_values.get((design, key))
        if ps:
            out.append(Rate(name, design, int(sum(p <= alpha for p in ps)), len(ps)))
    return out


def headline(found: list[Rate], kfold: str = "kfold") -> str:
    """`calibration: 5-fold paired_t FPR 0.05 [0.02, 0.12], corrected_t ...; 5x2 folds
    paired_t ..., corrected_t ..., 5x2cv ... over N nulls (alpha 0.05)`."""
    by = {(r.design, r.name): r for r in found}
    groups = []
    for design, label, names in (("kfold", kfold, ("paired_t", "corrected_t")),
                                 ("5x2", "5x2 folds", ("paired_t", "corrected_t", "5x2cv"))):
        parts = [f"{name} FPR {by[design, name].cell()}" for name in names if (design, name) in by]
        if parts:
            groups.append(f"{label} {', '.join(parts)}")
    nulls = max(r.nulls for r in found)
    return f"calibration: {'; '.join(groups)} over {nulls} nulls (alpha {ALPHA})"


# ----------------------------------------------------------------------------- training


@dataclass
class Bench:
    images: np.ndarray  # NHWC uint8
    labels: np.ndarray
    cfg: object
    epochs: int

    def score(self, train_idx: np.ndarray, val_idx: np.ndarray, seed: int) -> float:
        """Validation accuracy of the config's network trained `epochs` epochs from `seed`
        (its weights and its batch order), as one fold of `pipeline cv` would be."""
        cfg = self.cfg
        torch.manual_seed(seed)
        mean, std = channel_stats(self.images, train_idx)  # data.normalize: the training images' own
        arch = model_args(cfg, num_classes=10)
        net = build_network(arch.pop("name"), arch, mean=mean, std=std, resize=cfg.data.resize,
                            init=to_container(cfg.init))
        opt_cfg = to_container(cfg.optimizer)
        optimizer = build_optimizer(net.parameters(), opt_cfg.pop("name"), **opt_cfg)
        batches = TensorBatches(self.images, self.labels, train_idx, batch_size=cfg.data.batch_size, shuffle=True,
                                seed=seed)
        net.train()
        for _ in range(self.epochs):
            for xb, yb in batches:
                loss = F.cross_entropy(net(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        net.eval()
        with torch.no_grad():
            logits = net(to_batch(gather(self.images, val_idx)))
        return float((logits.argmax(dim=1) == torch.from_numpy(self.labels[val_idx])).float().mean())

    def null(self, splits: Splits, seeds: tuple[int, int]) -> dict[str, list[float]]:
        """Both seeds' fold scores on every fold of `splits` (repetition-major)."""
        folds = [splits.fold(i) for i in range(len(splits.folds))]
        return {f"seed{s}": [self.score(tr, va, s) for tr, va in folds] for s in seeds}


def fold_sizes(splits: Splits) -> tuple[float, float]:
    """(n_train, n_test) of a fold, averaged, as `pipeline compare` passes them."""
    trainval = len(splits.train) + len(splits.val)
    n_test = float(np.mean([len(f) for f in splits.folds]))
    return trainval - n_test, n_test


def run(nulls: int, epochs: int, folds: int, seed: int, five_by_two: bool = True, repeats: int = 1,
        log: Callable[[str], None] = lambda line: print(line, flush=True)) -> list[Rate]:
    """`nulls` planted nulls; the false-positive rate of every test."""
    cfg = compose(["model=mlp", "scheduler=none", "regularizer=none"], conf=CONF_DIR)
    with tempfile.TemporaryDirectory() as tmp:  # digits ships with scikit-learn: nothing is downloaded
        images, labels, _, _ = load_source("digits", download_dir=Path(tmp))
    bench = Bench(images, labels.astype(np.int64), cfg, epochs)
    s = cfg.data.split
    p_values: dict[tuple[str, str], list[float]] = {}
    start = time.perf_counter()
    for j in range(nulls):
        # A new split and a new pair of seeds per null; the same for both designs within it.
        split_seed, seeds = seed + 1000 * j, (seed + 2 * j, seed + 2 * j + 1)
        designs = [("kfold", make_splits(labels, val_fraction=s.val_fraction, test_fraction=s.test_fraction,
                                         folds=folds, repeats=repeats, seed=split_seed), repeats)]
        if five_by_two:
            designs.append(("5x2", make_splits(labels, val_fraction=s.val_fraction, test_fraction=s.test_fraction,
                                               folds=2, repeats=5, seed=split_seed), 5))
        for design, splits, reps in designs:
            n_train, n_test = fold_sizes(splits)
            out = compare_alternatives(bench.null(splits, seeds), repeats=reps, n_train=n_train, n_test=n_test)
            pair = out["pairs"][0]
            for d, key, _ in ROWS:
                if d == design and pair.get(key) is not None:
                    p_values.setdefault((design, key), []).append(pair[key]["p_value"])
        if (j + 1) % max(1, nulls // 10) == 0 or j + 1 == nulls:
            done = rates(p_values)
            log(f"  {j + 1}/{nulls} nulls, {time.perf_counter() - start:.0f} s: "
                + ", ".join(f"{r.design} {r.name} {r.rejections}" for r in done))
    return rates(p_values)


def table(found: list[Rate], kfold: str = "kfold") -> str:
    lines = ["| folds | test | false positives | FPR [95% Wilson CI] |", "|---|---|---|---|"]
    for r in found:
        label = kfold if r.design == "kfold" else "5x2"
        lines.append(f"| {label} | {r.name} | {r.rejections}/{r.nulls} | {r.cell()} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nulls", type=int, default=60, help="planted nulls (comparisons of seed twins)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per fold")
    parser.add_argument("--folds", type=int, default=5, help="k of the k-fold design (pipeline default 5)")
    parser.add_argument("--repeats", type=int, default=1, help="cv.repeats of the k-fold design")
    parser.add_argument("--seed", type=int, default=0, help="first seed; null j uses seeds 2j, 2j+1 after it")
    parser.add_argument("--no-5x2", dest="five_by_two", action="store_false", help="skip the 5x2cv design")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.nulls < 1 or args.epochs < 1 or args.repeats < 1 or args.folds < 2:
        parser.error("--nulls, --epochs and --repeats must be at least 1, --folds at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    start = time.perf_counter()
    kfold = f"{args.repeats}x{args.folds}-fold" if args.repeats > 1 else f"{args.folds}-fold"
    found = run(args.nulls, args.epochs, args.folds, args.seed, args.five_by_two, args.repeats)
    print(f"\n{args.nulls} nulls, MLP {args.epochs} epochs, {kfold}{' and 5x2' if args.five_by_two else ''}, "
          f"{time.perf_counter() - start:.0f} s\n")
    print(table(found, kfold))
    line = headline(found, kfold)
    print(line)
    return line


if __name__ == "__main__":
    main()
