"""Explanation reports of a trained run: pick test images, explain them, save a PNG and an ``.npz``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax import checkpoint, explain, models, parallel
from lenet_jax.attribution import explainer, with_dataset_options
from lenet_jax.data import get_dataset, load_dataset, to_pixels
from lenet_jax.explain.common import check_batch
from lenet_jax.image_files import read_images
from lenet_jax.io import atomic_savez, writable_folder
from lenet_jax.predict import predict

# A figure shows one row per image: more is unreadable, and slow to draw.
MAX_FIGURE_IMAGES = 64


def pick_examples(pred: np.ndarray, labels: np.ndarray, n: int, mix_wrong: bool) -> np.ndarray:
    """Indices of ``n`` test images: the first ones, or (``mix_wrong``) a quarter misclassified."""
    if not mix_wrong:
        return np.arange(min(n, len(labels)))
    n = min(n, len(labels))
    all_wrong, all_right = np.flatnonzero(pred != labels), np.flatnonzero(pred == labels)
    right = all_right[: n - min(len(all_wrong), max(1, n // 4))]
    wrong = all_wrong[: n - len(right)]  # more than a quarter when too few are right
    return np.sort(np.concatenate([right, wrong]))


def explain_method(name: str, model, params, x, target=None, *, dataset="mnist", **options):
    """``[B, H, W]`` maps of method ``name`` for ``x`` (channels summed), computed in one program,
    with the batch split over every device when there are several (``lenet_jax.parallel``)."""
    check_batch(x)
    mesh = parallel.default_mesh()
    n = x.shape[0] + (-x.shape[0] % mesh.size if mesh is not None else 0)  # as sharded
    spec = jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype)
    fn = explainer(name, model, spec, dataset, **options)
    out = parallel.sharded_call(fn, mesh, params, x, target)
    return out if out.ndim == 3 else out.sum(-1)


# Options the command line does not pass on: they need arrays (key), change the output's type or
# shape (return_gap, upsample), or have flags of their own (--composite, --layer).
_NOT_FROM_CLI = ("key", "return_gap", "upsample", "composite", "layer")


def split_options(method: str, options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Method name -> its share of ``options``, checked against the methods' keyword options.

    For ``method="all"`` an option goes to every method that takes it.

    Raises:
      ValueError: an option no chosen method takes, or a value of the wrong type.
    """
    names = list(explain.METHODS) if method == "all" else [method]
    accepted = {
        name: {k: v for k, v in explain.method_options(name).items() if k not in _NOT_FROM_CLI}
        for name in names
    }
    out = {name: {} for name in names}
    for key, value in options.items():
        takers = [name for name in names if key in accepted[name]]
        if not takers:
            valid = sorted({k for name in names for k in accepted[name]})
            raise ValueError(f"unknown option {key!r} for {method}; choose one of {valid}")
        for name in takers:
            out[name][key] = _typed(key, value, accepted[name][key])
    return out


def _typed(key: str, value, default):
    """``value`` checked against the type of the option's ``default`` (ints pass as floats)."""
    if default is None or value is None:
        return value
    kind = type(default)
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        raise ValueError(f"option {key} must be of type {kind.__name__}, got {value!r}")
    return value


def explain_run(
    run_dir: str | Path,
    method: str,
    *,
    epoch: int | None = None,
    n: int = 16,
    indices: Sequence[int] | None = None,
    images: Sequence[str | Path] | None = None,
    target: int | None = None,
    out: str | Path | None = None,
    layer: str | None = None,
    composite: str | None = None,
    options: Mapping[str, Any] | None = None,
    data_dir=None,
    data_source=None,
) -> dict[str, Path]:
    """Explains test images (or image files) with the newest checkpoint in ``run_dir`` and saves
    the figures. Everything is checked and computed before the first file is written.

    Args:
      method: a name in ``explain.METHODS`` or ``"all"`` (the side-by-side comparison).
      epoch: the checkpoint of this epoch (default: the newest).
      n: how many test images: the first ``n``, or for ``"all"`` a mix with a quarter misclassified.
      indices: these test images instead.
      images: these image files instead of test images (``image_files.read_images``: inverted if
        dark on light, and laid out as MNIST digits for MNIST models).
      target: the class explained in every image (default: each image's predicted class).
      out: the PNG path; default ``run_dir/`` + ``output_name(...)``, one name per method, options
        and inputs. The ``.npz`` sits beside it.
      layer: for LRP, also draw the relevance of this layer's feature maps; for CAMs, their layer.
      composite: the LRP composite (default: the model's, ``models.default_composite``).
      options: more keyword options of the method (``explain.method_options``), e.g.
        ``{"n_samples": 100}`` for SmoothGrad; with ``"all"`` each goes to the methods that take it.

    Returns:
      Paths of what was written (``png``, ``npz`` and, for LRP with ``layer``, ``layer_png``).

    Raises:
      ValueError: a bad choice, more than ``MAX_FIGURE_IMAGES`` images, a target out of range.
      lenet_jax.io.OutputError: ``out``'s folder cannot be written (checked before any work).
    """
    per_method = _check_request(method, n, indices, images, layer, options or {})
    if out is not None:
        out = Path(out)
        if out.suffix.lower() != ".png":
            raise ValueError(f"--out must name a .png file, got {out}")
    writable_folder(Path(run_dir) if out is None else out.parent, "--out")
    model, params, meta = checkpoint.load_params(run_dir, epoch)
    dataset = meta["dataset"]
    composite = composite or models.default_composite(model)  # names the default output
    if out is None:
        out = Path(run_dir) / output_name(
            method, composite, target, layer, options, n, indices, images
        )
    classes = get_dataset(dataset).classes
    # explain's own range check sees only concrete targets; under jit the target is traced
    if target is not None and not 0 <= target < len(classes):
        raise ValueError(
            f"target {target} out of range: the model has classes 0..{len(classes) - 1}"
        )
    x, logits, y, source = _chosen_inputs(
        model, params, dataset, method, n, indices, images, data_dir, data_source
    )
    for name, opts in per_method.items():
        if name == "lrp":
            opts.setdefault("composite", composite)
        if layer and name in explain.CAM_METHODS:
            opts.setdefault("layer", layer)
    view = _View(x, logits, y, target, classes, np.asarray(to_pixels(x, dataset)))
    arrays = {**source, "pred": view.pred, "logits": logits, "target": view.explained}
    arrays["classes"] = np.array(classes)
    maps = {
        name: np.asarray(
            explain_method(name, model, params, x, target=target, dataset=dataset, **opts)
        )
        for name, opts in per_method.items()
    }
    if method == "all":
        arrays.update(maps)
        titles = [view.describe(i, True) for i in range(len(x))]
        figures = {"png": (out, _comparison_figure(view, maps, titles))}
    else:
        heat = arrays["attribution"] = maps[method]
        if method == "lrp":
            arrays["relevance_sum"] = heat.reshape(len(x), -1).sum(1)
        figures = {"png": (out, _method_figure(view, method, heat, composite))}
        if method == "lrp" and layer:
            figure = _feature_map_figure(
                model, params, dataset, x, target, layer, view, per_method["lrp"]
            )
            figures["layer_png"] = (out.with_name(out.stem + f"_{layer}.png"), figure)
    return _save(out, arrays, figures)


def _check_request(method, n, indices, images, layer, options) -> dict[str, dict[str, Any]]:
    """Checks what ``explain_run`` was asked before any work; returns ``split_options``' result."""
    if method != "all" and method not in explain.METHODS:
        raise ValueError(
            f"unknown method {method!r}; choose one of {sorted(explain.METHODS)} or all"
        )
    if layer and method not in ("lrp", "all", *explain.CAM_METHODS):
        raise ValueError(f"--layer applies to lrp and the CAMs, not to {method}")
    if indices is not None and images is not None:
        raise ValueError("give test indices or image files, not both")
    count = len(images) if images is not None else len(indices) if indices is not None else n
    if count > MAX_FIGURE_IMAGES:
        raise ValueError(
            f"{count} images asked for, but a figure shows at most {MAX_FIGURE_IMAGES}; "
            "explain fewer (or use scripts/evaluate.py to score many)"
        )
    return split_options(method, options)


def output_name(method, composite, target, layer, options, n, indices, images) -> str:
    """The default file name of an explanation: one per method, options and inputs, e.g.
    ``explain_lrp_epsilon_plus_flat_first16.png``, ``explain_all_my_digit.png``,
    ``explain_smoothgrad_n_samples=100_target3_indices0-7-42.png``."""
    parts = [method]
    if method in ("lrp", "all"):
        parts.append(composite)
    parts += [f"{k}={v}" for k, v in sorted((options or {}).items())]
    if layer:
        parts.append(layer)
    if target is not None:
        parts.append(f"target{target}")
    if images is not None:
        stems = [Path(p).stem for p in images]
        parts.append("-".join(stems[:3]) + (f"-and{len(stems) - 3}more" if len(stems) > 3 else ""))
    elif indices is not None:
        parts.append(
            "indices" + "-".join(map(str, indices[:8])) + ("-etc" if len(indices) > 8 else "")
        )
    else:
        parts.append(f"first{n}")
    name = "_".join(["explain", *parts])
    return "".join(c if c.isalnum() or c in "._=-" else "-" for c in name) + ".png"


@dataclasses.dataclass(frozen=True)
class _View:
    """What the figures show of the explained inputs: pixels, labels, predictions, the target."""

    x: np.ndarray
    logits: np.ndarray
    labels: np.ndarray  # -1 for image files
    target: int | None
    classes: Sequence[str]
    pixels: np.ndarray

    @property
    def pred(self) -> np.ndarray:
        return self.logits.argmax(1)

    @property
    def explained(self) -> np.ndarray:
        return self.pred if self.target is None else np.full(len(self.pred), self.target)

    def describe(self, i: int, mark: bool) -> str:
        """``true 7 / pred 7``; ``mark``: with ✓/✗ and the confidence; a second line
        ``explains 3`` when a target was chosen."""
        classes, t, p = self.classes, self.labels[i], self.pred[i]
        probs = np.asarray(jax.nn.softmax(jnp.asarray(self.logits[i])))
        parts = [f"true {classes[t]}"] if t >= 0 else []
        parts.append(f"pred {classes[p]}" + (f" ({probs[p]:.2f})" if mark else ""))
        text = " / ".join(parts)
        if mark and t >= 0:
            text = f"{'✓' if p == t else '✗'} {text}"
        if self.target is not None:
            text += f"\nexplains {classes[self.target]}"
        return text


def _comparison_figure(view: _View, maps, titles):
    from lenet_jax import plot

    return plot.method_comparison(view.pixels, maps, explain.SIGNED, titles)


def _method_figure(view: _View, method: str, heat, composite: str):
    """One method's heatmaps beside the inputs; LRP's titles add ΣR against the target logit."""
    from lenet_jax import plot

    titles = [view.describe(i, False) for i in range(len(view.x))]
    if method == "lrp":
        sums = heat.reshape(len(heat), -1).sum(1)
        titles = [
            f"{t}\nΣR {s:.2f} / logit {view.logits[i, view.explained[i]]:.2f}"
            for i, (t, s) in enumerate(zip(titles, sums, strict=True))
        ]
    signed = explain.SIGNED[method]
    label = f"LRP ({composite})" if method == "lrp" else method.replace("_", " ")
    suptitle = f"{label}: red = evidence for the class, blue = against" if signed else label
    if method == "lrp":
        suptitle += (
            "\nΣR / logit: what the map sums to, against the explained class's logit "
            "(equal when every rule conserves relevance and no bias takes a share)"
        )
    return plot.heatmap_pairs(view.pixels, heat, titles, signed=signed, suptitle=suptitle)


def _save(out: Path, arrays: dict, figures: dict) -> dict[str, Path]:
    from lenet_jax import plot

    written = {"npz": atomic_savez(out.with_suffix(".npz"), **arrays)}
    for key, (path, fig) in figures.items():
        written[key] = plot.save(fig, path)
    return written


def _chosen_inputs(model, params, dataset, method, n, indices, images, data_dir, data_source):
    """``(x, logits, labels, saved)``: the normalized inputs to explain, their logits, their labels
    (``-1`` for image files) and what identifies them in the ``.npz`` (indices or file names)."""
    inputs = models.model_input(model, dataset)
    if images is not None:
        raw = read_images(images, dataset)
        logits = np.asarray(predict(model, params, jnp.asarray(raw), dataset))
        labels = np.full(len(raw), -1)
        return inputs.preprocess(raw), logits, labels, {"files": np.array([str(p) for p in images])}
    test_images, test_labels = load_dataset(
        dataset, "test", data_dir=data_dir, source=data_source, progress=False
    )
    logits_all = np.asarray(predict(model, params, jnp.asarray(test_images), dataset))
    if indices is None:
        idx = pick_examples(logits_all.argmax(1), test_labels, n, mix_wrong=(method == "all"))
    else:
        idx = np.asarray(indices, dtype=np.int64)
        bad = idx[(idx < 0) | (idx >= len(test_labels))]
        if bad.size:
            raise ValueError(
                f"test index {bad[0]} out of range: the test set has {len(test_labels)} images"
            )
    labels = test_labels[idx]
    saved = {"indices": idx, "labels": labels}
    return inputs.preprocess(test_images[idx]), logits_all[idx], labels, saved


def _feature_map_figure(model, params, dataset, x, target, layer, view: _View, lrp_options):
    """The relevance of ``layer``'s feature maps for the first image, ranked, with the rules and
    options (``lrp_options``, as passed to ``explain.lrp``) of the heatmaps beside it."""
    from lenet_jax import plot

    one_image = {k: v for k, v in lrp_options.items() if k != "batch_size"}
    rule_options = with_dataset_options("lrp", model, dataset, one_image)
    rels = jax.jit(
        lambda p, v: explain.lrp_layerwise(
            models.explained(model, p), v, target=target, **rule_options
        )
    )(params, x[:1])
    nodes = explain.lrp_nodes(models.explained(model, params), x[:1])
    maps = sorted(k for k, kind in nodes.items() if kind == "conv" and rels[k].ndim == 4)
    if layer not in maps:
        raise ValueError(f"unknown layer {layer!r} for feature maps; choose one of {maps}")
    title = f"Relevance of {layer}'s feature maps, {view.describe(0, False)}, ranked"
    return plot.feature_map_relevance(np.asarray(rels[layer][0]), view.pixels[0], title)
