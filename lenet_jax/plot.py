"""Figures: training curves, per-class accuracy, confusion matrix, digit grids, heatmaps.

Nothing in the computing modules imports this one. Every function returns a matplotlib ``Figure``;
``save`` writes it atomically and closes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lenet_jax.io import atomic_savefig  # noqa: E402


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Writes ``fig`` to ``path`` atomically and closes it."""
    out = atomic_savefig(fig, path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return out


def training_curves(history: Sequence[dict]):
    """Loss and accuracy per epoch, train and test, from ``metrics.json``'s ``history``."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, style in (("train", "-o"), ("test", "--s")):
        ax_l.plot(epochs, [h[split]["loss"] for h in history], style, label=split)
        ax_a.plot(epochs, [100 * h[split]["accuracy"] for h in history], style, label=split)
    ax_l.set(xlabel="epoch", ylabel="cross-entropy", title="Loss", yscale="log")
    ax_a.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def per_class_accuracy(per_class: Sequence[float]):
    """Bar chart of test accuracy per class."""
    acc = 100 * np.asarray(per_class)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(range(len(acc)), acc, color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set(
        xticks=range(len(acc)), xlabel="class", ylabel="accuracy (%)",
        ylim=(max(0.0, acc.min() - 3), 100.5), title="Test accuracy per class",
    )
    fig.tight_layout()
    return fig


def confusion_matrix(confusion: Sequence[Sequence[int]]):
    """Confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(np.log1p(cm), cmap="Blues")
    k = cm.shape[0]
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                color = "white" if cm[i, j] > cm.max() / 3 else "black"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true",
           title="Confusion matrix (test)")
    fig.tight_layout()
    return fig


def digit_grid(images, titles: Sequence[str], colors: Sequence[str] | None = None, ncols: int = 8,
               suptitle: str | None = None):
    """A grid of grey digits with a title each.

    Args:
      images: ``[N, H, W]`` pixel values.
      titles: one per image.
      colors: optional title colour per image.
    """
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.3 * ncols, 1.5 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap="gray_r")
            ax.set_title(titles[i], fontsize=8, color=(colors[i] if colors else "black"))
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig
