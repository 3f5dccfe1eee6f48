"""Explanation reports of a trained run: pick test digits, explain them, save a PNG and an ``.npz``."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax import checkpoint, explain
from lenet_jax.data import load_mnist, preprocess, to_pixels
from lenet_jax.io import atomic_savez

SIGNED = {
    "lrp": True, "saliency": False, "gradient_x_input": True, "smoothgrad": True,
    "integrated_gradients": True, "grad_cam": False, "score_cam": False, "occlusion": True,
}


def pick_examples(pred: np.ndarray, labels: np.ndarray, n: int, mix_wrong: bool) -> np.ndarray:
    """Indices of ``n`` test images: the first ones, or (``mix_wrong``) a quarter misclassified."""
    if not mix_wrong:
        return np.arange(min(n, len(labels)))
    wrong = np.flatnonzero(pred != labels)[: max(1, n // 4)]
    right = np.flatnonzero(pred == labels)[: n - len(wrong)]
    return np.sort(np.concatenate([right, wrong]))


def explain_method(name: str, model, params, x, **options):
    """``[B, H, W]`` maps of method ``name`` for ``x`` (channels summed), computed in one jit."""
    fn = jax.jit(functools.partial(explain.attribute, name, model, **options))
    out = fn(params, x)
    return out if out.ndim == 3 else out.sum(-1)


def explain_run(
    run_dir: str | Path,
    method: str,
    *,
    n: int = 16,
    out: str | Path | None = None,
    layer: str | None = None,
    composite: str = "epsilon_plus_flat",
    data_dir=None,
    data_source=None,
) -> dict[str, Path]:
    """Explains ``n`` test digits of the newest checkpoint in ``run_dir`` and saves the figures.

    Args:
      method: a name in ``explain.METHODS`` or ``"all"`` (the side-by-side comparison).
      out: the PNG path (default ``run_dir/explain_<method>.png``); the ``.npz`` sits beside it.
      layer: for LRP, also draw the relevance of this layer's feature maps; for CAMs, their layer.
      composite: the LRP composite.

    Returns:
      Paths of what was written (``png``, ``npz`` and, for LRP with ``layer``, ``layer_png``).
    """
    from lenet_jax import plot

    if method != "all" and method not in explain.METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(explain.METHODS)} or all")
    model, params, _ = checkpoint.load_params(run_dir)
    images, labels = load_mnist("test", data_dir=data_dir, source=data_source, progress=False)
    logits_all = np.asarray(jax.jit(lambda p, i: model.apply({"params": p}, preprocess(i)))(
        params, jnp.asarray(images)))
    pred_all = logits_all.argmax(1)
    idx = pick_examples(pred_all, labels, n, mix_wrong=(method == "all"))
    x = preprocess(images[idx])
    logits, pred, y = logits_all[idx], pred_all[idx], labels[idx]
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    pixels = np.asarray(to_pixels(x))
    out = Path(out) if out else Path(run_dir) / f"explain_{method}.png"
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out}")
    written = {}

    if method == "all":
        maps = {}
        for name in explain.METHODS:
            options = {"composite": composite} if name == "lrp" else {}
            if name in explain.CAM_METHODS and layer:
                options["layer"] = layer
            maps[name] = np.asarray(explain_method(name, model, params, x, **options))
        titles = [
            f"{'✓' if p == t else '✗'} true {t} / pred {p} ({probs[i, p]:.2f})"
            for i, (t, p) in enumerate(zip(y, pred))
        ]
        fig = plot.method_comparison(pixels, maps, SIGNED, titles)
        written["npz"] = atomic_savez(out.with_suffix(".npz"), indices=idx, labels=y, pred=pred,
                                      logits=logits, **maps)
    else:
        options = {}
        if method == "lrp":
            options["composite"] = composite
        elif method in explain.CAM_METHODS and layer:
            options["layer"] = layer
        heat = np.asarray(explain_method(method, model, params, x, **options))
        titles = [f"true {t} / pred {p}" for t, p in zip(y, pred)]
        extra = {}
        if method == "lrp":
            sums = heat.reshape(len(idx), -1).sum(1)
            titles = [f"{t}\nΣR {s:.2f} / logit {logits[i, pred[i]]:.2f}"
                      for i, (t, s) in enumerate(zip(titles, sums))]
            extra = {"relevance_sum": sums}
        label = f"LRP ({composite})" if method == "lrp" else method.replace("_", " ")
        fig = plot.heatmap_pairs(pixels, heat, titles, signed=SIGNED[method],
                                 suptitle=f"{label}: red = evidence for the class, blue = against"
                                 if SIGNED[method] else label)
        written["npz"] = atomic_savez(out.with_suffix(".npz"), indices=idx, labels=y, pred=pred,
                                      logits=logits, attribution=heat, **extra)
        if method == "lrp" and layer:
            rels = jax.jit(functools.partial(explain.lrp_layerwise, model, composite=composite))(
                params, x)
            maps = sorted(k for k, v in rels.items() if v.ndim == 4 and k != "input")
            if layer not in maps:
                raise ValueError(f"unknown layer {layer!r} for feature maps; choose one of {maps}")
            layer_png = out.with_name(out.stem + f"_{layer}.png")
            written["layer_png"] = plot.save(plot.feature_map_relevance(
                np.asarray(rels[layer][0]), pixels[0],
                f"Relevance of {layer}'s feature maps, digit {y[0]} (pred {pred[0]}), ranked"),
                layer_png)
    written["png"] = plot.save(fig, out)
    return written
