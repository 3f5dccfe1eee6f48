"""Figures: training curves, per-class accuracy, confusion matrix, digit grids, heatmaps.

Nothing in the computing modules imports this one. Every function returns a matplotlib ``Figure``;
``save`` writes it atomically and closes it. The backend is left to matplotlib (``Agg`` without a
display, inline in notebooks).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from lenet_jax.io import atomic_savefig


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


def per_class_accuracy(per_class: Sequence[float], classes: Sequence[str] | None = None):
    """Bar chart of test accuracy per class (``classes``: tick labels, default the indices)."""
    acc = 100 * np.asarray(per_class)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(range(len(acc)), acc, color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(acc)), classes or range(len(acc)), rotation=45 if classes else 0)
    ax.set(
        xlabel="class",
        ylabel="accuracy (%)",
        ylim=(max(0.0, acc.min() - 3), 100.5),
        title="Test accuracy per class",
    )
    fig.tight_layout()
    return fig


def confusion_matrix(confusion: Sequence[Sequence[int]], classes: Sequence[str] | None = None):
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
    ax.set_xticks(range(k), classes or range(k), rotation=90 if classes else 0)
    ax.set_yticks(range(k), classes or range(k))
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix (test)",
    )
    fig.tight_layout()
    return fig


def digit_grid(
    images,
    titles: Sequence[str],
    colors: Sequence[str] | None = None,
    ncols: int = 8,
    suptitle: str | None = None,
):
    """A grid of images (grey digits drawn dark on light) with a title each.

    Args:
      images: ``[N, H, W]`` grey or ``[N, H, W, 3]`` color pixel values.
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


def _show_heat(ax, pixels, heat, signed: bool):
    """A heatmap on ``ax``: signed -> red/blue around 0; otherwise a sequential map over the digit."""
    if signed:
        lim = float(np.abs(heat).max()) or 1.0
        ax.imshow(heat, cmap="bwr", vmin=-lim, vmax=lim)
        if pixels.ndim == 2:  # a gray digit's outline; color images stand beside the maps instead
            ax.contour(pixels, levels=[0.5], colors="k", linewidths=0.3, alpha=0.4)
    else:
        ax.imshow(pixels, cmap="gray_r")
        top = float(heat.max()) or 1.0
        ax.imshow(heat, cmap="inferno", alpha=0.6, vmin=0.0, vmax=top)
    ax.axis("off")


def heatmap_pairs(
    pixels,
    heatmaps,
    titles: Sequence[str],
    signed: bool = True,
    ncols: int = 4,
    suptitle: str | None = None,
):
    """Digit and heatmap side by side for each image, ``ncols`` pairs per row.

    Args:
      pixels: ``[N, H, W]`` in [0, 1].
      heatmaps: ``[N, H, W]``; signed maps use a colour scale symmetric around 0 (red > 0 > blue).
      titles: one per image (shown over the heatmap).
    """
    n = len(pixels)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(
        nrows, 2 * ncols, figsize=(2.4 * ncols, 1.35 * nrows + 0.4), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        a_img, a_heat = axes[i // ncols, 2 * (i % ncols)], axes[i // ncols, 2 * (i % ncols) + 1]
        a_img.imshow(pixels[i], cmap="gray_r")
        _show_heat(a_heat, pixels[i], heatmaps[i], signed)
        a_heat.set_title(titles[i], fontsize=6.5)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def method_comparison(pixels, maps: dict, signed: dict, row_titles: Sequence[str]):
    """Rows = images, columns = the input and each method's map, with a colour legend below.

    Args:
      pixels: ``[N, H, W]`` in [0, 1].
      maps: method name -> ``[N, H, W]``.
      signed: method name -> whether its map is signed.
      row_titles: one per image (true/predicted label and confidence); a title with ✗ (a
        misclassified image) is drawn in red.
    """
    n, m = len(pixels), len(maps)
    fig, axes = plt.subplots(n, m + 1, figsize=(1.5 * (m + 1), 1.5 * n + 0.9), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(pixels[i], cmap="gray_r")
        wrong = "✗" in row_titles[i]
        axes[i, 0].set_title(row_titles[i], fontsize=7.5, color="red" if wrong else "black")
        axes[i, 0].axis("off")
        for j, (name, heat) in enumerate(maps.items(), start=1):
            _show_heat(axes[i, j], pixels[i], heat[i], signed[name])
            if i == 0:
                axes[i, j].set_title(name.replace("_", " "), fontsize=8.5, fontweight="bold")
    fig.tight_layout(rect=(0, 0.9 / (1.5 * n + 0.9), 1, 1))
    _heat_legend(
        fig, signed_present=any(signed.values()), unsigned_present=not all(signed.values())
    )
    return fig


def _heat_legend(fig, *, signed_present: bool, unsigned_present: bool) -> None:
    """Colour bars at the bottom of ``fig`` saying what the heatmaps' colours mean."""
    import matplotlib as mpl

    bars = []
    if signed_present:
        bars.append(("bwr", (-1, 1), "signed maps: red = evidence for the class, blue = against"))
    if unsigned_present:
        bars.append(("inferno", (0, 1), "saliency and CAMs: bright = important (no sign)"))
    height = 0.22 / fig.get_size_inches()[1]
    for k, (cmap, (lo, hi), label) in enumerate(bars):
        ax = fig.add_axes((0.08 + 0.47 * k, 0.35 * height, 0.37, height))
        norm = mpl.colors.Normalize(lo, hi)
        bar = fig.colorbar(mpl.cm.ScalarMappable(norm, cmap), cax=ax, orientation="horizontal")
        bar.set_ticks([lo, 0, hi] if lo < 0 else [lo, hi])
        bar.set_ticklabels(["−max", "0", "+max"] if lo < 0 else ["0", "max"])
        bar.ax.tick_params(labelsize=6.5)
        bar.set_label(label, fontsize=7.5)


def feature_map_relevance(relevance_hwk, pixels, title: str = ""):
    """The relevance of each feature map of a layer for one image, ranked by its total.

    Args:
      relevance_hwk: ``[h, w, K]`` relevance at the layer's output.
      pixels: ``[H, W]`` the digit, shown first.
    """
    k = relevance_hwk.shape[-1]
    totals = relevance_hwk.sum(axis=(0, 1))
    order = np.argsort(-totals)
    ncols = min(8, k + 1)
    nrows = -(-(k + 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.4 * ncols, 1.55 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(pixels, cmap="gray_r")
    axes[0, 0].set_title("input", fontsize=7)
    lim = float(np.abs(relevance_hwk).max()) or 1.0
    for slot, ch in enumerate(order, start=1):
        ax = axes[slot // ncols, slot % ncols]
        image = ax.imshow(relevance_hwk[..., ch], cmap="bwr", vmin=-lim, vmax=lim)
        ax.set_title(f"map {ch}: {totals[ch]:+.2f}", fontsize=6.5)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    scale = fig.add_axes((0.94, 0.15, 0.015, 0.7))
    bar = fig.colorbar(image, cax=scale)
    bar.set_label("relevance per cell (red: for the class, blue: against)", fontsize=7)
    bar.ax.tick_params(labelsize=6.5)
    return fig


# Colour families of the flipping curves: LRP composites in reds, gradient methods in blues,
# CAMs in greens, occlusion in grey.
_FAMILIES = (
    (lambda name: name.startswith("lrp"), "Reds"),
    (
        lambda name: name in ("saliency", "gradient_x_input", "smoothgrad", "integrated_gradients"),
        "Blues",
    ),
    (lambda name: name.endswith("cam"), "Greens"),
    (lambda name: True, "Greys"),
)


# Line styles within a family, so that its members (six LRP composites) are told apart in print.
_STYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)), (0, (3, 3)))
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def _family_styles(names) -> dict:
    """Method -> ``dict(color=..., ls=..., marker=...)``: a colour map per family, shades, line
    styles and markers within it."""
    styles = {}
    for belongs, cmap in _FAMILIES:
        members = [n for n in names if n not in styles and belongs(n)]
        levels = np.linspace(0.45, 0.95, len(members)) if len(members) > 1 else [0.8]
        shades = plt.get_cmap(cmap)(levels)
        for k, (name, shade) in enumerate(zip(members, shades, strict=False)):
            styles[name] = dict(
                color=shade, ls=_STYLES[k % len(_STYLES)], marker=_MARKERS[k % len(_MARKERS)]
            )
    return styles


def flipping_curves(curves: dict, random_curve: dict, random_band=None):
    """Pixel-flipping curves: mean target probability vs fraction removed, MoRF and LeRF panels,
    coloured by family (LRP composites red, gradient methods blue, CAMs green), each member of a
    family with its own line style and marker; the AOPC of each curve is in the legend under each
    panel.

    Args:
      curves: method -> {"morf": summary, "lerf": summary} (``explain.metrics.summarize_curves``).
      random_curve: the random-order summary; ``random_band``: ``(low, high)`` per step, shaded.
    """
    styles = _family_styles(list(curves))
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.4), sharey=True)
    for ax, order, better in zip(axes, ("morf", "lerf"), ("lower", "higher"), strict=True):
        frac = random_curve["fraction"]
        if random_band is not None:
            ax.fill_between(
                frac, random_band[0], random_band[1], color="0.85", label="random order (10–90%)"
            )
        ax.plot(frac, random_curve["prob"], color="0.4", ls=":", label="random order (mean)")
        for name, c in curves.items():
            ax.plot(
                c[order]["fraction"],
                c[order]["prob"],
                **styles[name],
                markersize=3.5,
                markevery=max(1, len(c[order]["fraction"]) // 8),
                label=f"{name} ({c[order]['aopc']:.3f})",
            )
        ax.set(
            xlabel="fraction of patches removed",
            title=f"{order.upper()}: {better} curve = more faithful",
        )
        ax.grid(alpha=0.3)
        ax.legend(
            fontsize=7,
            ncol=3,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.13),
            title=f"method ({order.upper()} AOPC)",
            title_fontsize=7.5,
        )
    axes[0].set_ylabel("target probability")
    fig.tight_layout()
    return fig


def randomization_cascade(pixels, cascades: dict, layers, signed: dict):
    """The randomization sanity check (Adebayo et al., 2018) as heatmaps: rows = methods, columns =
    the original model, then the layers re-initialized cumulatively from the output (column
    ``+conv2`` has conv2 and every layer above it random). A title, and a line that says how to
    read it, head the figure.

    Args:
      pixels: ``[H, W]`` the digit.
      cascades: method -> ``[L + 1, H, W]`` attributions (original first).
      layers: the randomized layer names in cascade order.
      signed: method -> whether its map is signed (by base method name).
    """
    names = list(cascades)
    cols = len(layers) + 2
    fig, axes = plt.subplots(
        len(names), cols, figsize=(1.3 * cols, 1.35 * len(names)), squeeze=False
    )
    for i, name in enumerate(names):
        axes[i, 0].imshow(pixels, cmap="gray_r")
        axes[i, 0].axis("off")
        axes[i, 0].set_title(name, fontsize=6)
        for j, heat in enumerate(cascades[name], start=1):
            _show_heat(axes[i, j], pixels, np.asarray(heat), signed.get(name.split(":")[0], True))
            if i == 0:
                axes[i, j].set_title("original" if j == 1 else f"+{layers[j - 2]}", fontsize=7)
    fig.suptitle(
        "Randomization sanity check: layers re-initialized cumulatively, from the output down",
        fontsize=9,
    )
    fig.text(
        0.5,
        1 - 0.55 / fig.get_figheight(),
        "column '+L': layer L and every layer above it random.  Signed maps: red = for the class, "
        "blue = against; others: darker = more important.  A faithful map turns to noise.",
        ha="center",
        fontsize=6.5,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))
    return fig
