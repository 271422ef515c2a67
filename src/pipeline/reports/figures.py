"""Static figures (PNG) for the pipeline's outputs and MLflow artifacts."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers, CI or Ray workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.files import save_figure  # noqa: E402


def confusion_matrix_png(cm: np.ndarray, classes: list[str], path: Path) -> Path:
    """Row-normalised confusion matrix with counts annotated when small enough to read."""
    n = len(classes)
    size = min(2 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set(xlabel="predicted", ylabel="actual", title="Confusion matrix (row-normalised)")
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def learning_curves_png(rows: list[dict], path: Path) -> Path:
    """Loss, accuracy and learning rate per epoch for train and validation."""
    epochs = [r["epoch"] + 1 for r in rows]  # stored 0-based (Lightning's count); shown from 1
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes[:2], ("loss", "acc")):
        for split in ("train", "val"):
            ax.plot(epochs, [r.get(f"{split}/{metric}") for r in rows], marker=".", label=split)
        ax.set(xlabel="epoch", title=metric)
        ax.legend()
        ax.grid(alpha=0.3)
    axes[2].plot(epochs, [r.get("lr") for r in rows], color="tab:green")
    axes[2].set(xlabel="epoch", title="learning rate")
    axes[2].grid(alpha=0.3)
    return save_figure(fig, path)
