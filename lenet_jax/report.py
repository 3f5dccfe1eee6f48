"""Explanation reports of a trained run: pick test images, explain them, save a PNG and an ``.npz``."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax import checkpoint, explain, models, parallel
from lenet_jax.data import get_dataset, load_dataset, to_pixels
from lenet_jax.explain.common import target_logit
from lenet_jax.image_files import read_images
from lenet_jax.io import atomic_savez
from lenet_jax.train import predict

SIGNED = {
    "lrp": True,
    "saliency": False,
    "gradient_x_input": True,
    "smoothgrad": True,
    "integrated_gradients": True,
    "grad_cam": False,
    "score_cam": False,
    "occlusion": True,
}


def pick_examples(pred: np.ndarray, labels: np.ndarray, n: int, mix_wrong: bool) -> np.ndarray:
    """Indices of ``n`` test images: the first ones, or (``mix_wrong``) a quarter misclassified."""
    if not mix_wrong:
        return np.arange(min(n, len(labels)))
    n = min(n, len(labels))
    all_wrong, all_right = np.flatnonzero(pred != labels), np.flatnonzero(pred == labels)
    right = all_right[: n - min(len(all_wrong), max(1, n // 4))]
    wrong = all_wrong[: n - len(right)]  # more than a quarter when too few are right
    return np.sort(np.concatenate([right, wrong]))


def attribution_fn(name: str, model, **options):
    """``(params, x, target=None) -> attribution`` of method ``name`` for a package model.

    The model's dataset fills the options the method takes and ``options`` leaves unset
    (``models.dataset_options``: the zᴮ bounds of LRP, the black baseline of Integrated Gradients
    and occlusion).
    """
    accepted = explain.method_options(name)
    dataset = models.dataset_options(model)
    opts = {**options}
    for key, value in dataset.items():
        if key in accepted and opts.get(key) is None:
            opts[key] = value

    def fn(params, x, target=None):
        return explain.attribute(name, models.explained(model, params), x, target, **opts)

    return fn


def explain_method(name: str, model, params, x, target=None, **options):
    """``[B, H, W]`` maps of method ``name`` for ``x`` (channels summed), computed in one jit,
    with the batch split over every device when there are several (``lenet_jax.parallel``)."""
    fn = jax.jit(functools.partial(attribution_fn(name, model, **options), target=target))
    out = parallel.sharded_call(fn, parallel.default_mesh(), params, x)
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
    n: int = 16,
    indices: Sequence[int] | None = None,
    images: Sequence[str | Path] | None = None,
    target: int | None = None,
    out: str | Path | None = None,
    layer: str | None = None,
    composite: str = "epsilon_plus_flat",
    options: Mapping[str, Any] | None = None,
    data_dir=None,
    data_source=None,
) -> dict[str, Path]:
    """Explains test images (or image files) with the newest checkpoint in ``run_dir`` and saves
    the figures. Everything is checked and computed before the first file is written.

    Args:
      method: a name in ``explain.METHODS`` or ``"all"`` (the side-by-side comparison).
      n: how many test images: the first ``n``, or for ``"all"`` a mix with a quarter misclassified.
      indices: these test images instead.
      images: these image files instead of test images (``image_files.read_images``: inverted if
        dark on light, and laid out as MNIST digits for MNIST models).
      target: the class explained in every image (default: each image's predicted class).
      out: the PNG path (default ``run_dir/explain_<method>.png``); the ``.npz`` sits beside it.
      layer: for LRP, also draw the relevance of this layer's feature maps; for CAMs, their layer.
      composite: the LRP composite.
      options: more keyword options of the method (``explain.method_options``), e.g.
        ``{"n_samples": 100}`` for SmoothGrad; with ``"all"`` each goes to the methods that take it.

    Returns:
      Paths of what was written (``png``, ``npz`` and, for LRP with ``layer``, ``layer_png``).
    """
    from lenet_jax import plot

    if method != "all" and method not in explain.METHODS:
        raise ValueError(
            f"unknown method {method!r}; choose one of {sorted(explain.METHODS)} or all"
        )
    if layer and method not in ("lrp", "all", *explain.CAM_METHODS):
        raise ValueError(f"--layer applies to lrp and the CAMs, not to {method}")
    if indices is not None and images is not None:
        raise ValueError("give test indices or image files, not both")
    per_method = split_options(method, options or {})
    out = Path(out) if out else Path(run_dir) / f"explain_{method}.png"
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out}")
    model, params, _ = checkpoint.load_params(run_dir)
    classes = get_dataset(model.dataset).classes
    # explain's own range check sees only concrete targets; under jit the target is traced
    if target is not None and not 0 <= target < len(classes):
        raise ValueError(
            f"target {target} out of range: the model has classes 0..{len(classes) - 1}"
        )

    x, logits, y, source = _chosen_inputs(
        model, params, method, n, indices, images, data_dir, data_source
    )
    pred = logits.argmax(1)
    explained = pred if target is None else np.full(len(pred), target)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    pixels = np.asarray(to_pixels(x, model.dataset))

    def describe(i, mark):
        """``true 7 / pred 7``; ``mark``: with ✓/✗ and the confidence; `` / explains 3``."""
        t, p = y[i], pred[i]
        parts = [f"true {classes[t]}"] if t >= 0 else []
        parts.append(f"pred {classes[p]}" + (f" ({probs[i, p]:.2f})" if mark else ""))
        if target is not None:
            parts.append(f"explains {classes[target]}")
        text = " / ".join(parts)
        return f"{'✓' if p == t else '✗'} {text}" if mark and t >= 0 else text

    arrays = {**source, "pred": pred, "logits": logits, "target": explained}
    figures = {}
    if method == "all":
        maps = {}
        for name in explain.METHODS:
            method_options = {"composite": composite} if name == "lrp" else {}
            if name in explain.CAM_METHODS and layer:
                method_options["layer"] = layer
            method_options.update(per_method[name])
            maps[name] = np.asarray(
                explain_method(name, model, params, x, target=target, **method_options)
            )
        titles = [describe(i, True) for i in range(len(x))]
        figures["png"] = (out, plot.method_comparison(pixels, maps, SIGNED, titles))
        arrays.update(maps)
    else:
        method_options = {}
        if method == "lrp":
            method_options["composite"] = composite
        elif method in explain.CAM_METHODS and layer:
            method_options["layer"] = layer
        method_options.update(per_method[method])
        heat = np.asarray(explain_method(method, model, params, x, target=target, **method_options))
        titles = [describe(i, False) for i in range(len(x))]
        arrays["attribution"] = heat
        if method == "lrp":
            sums = heat.reshape(len(x), -1).sum(1)
            titles = [
                f"{t}\nΣR {s:.2f} / logit {logits[i, explained[i]]:.2f}"
                for i, (t, s) in enumerate(zip(titles, sums, strict=True))
            ]
            arrays["relevance_sum"] = sums
        label = f"LRP ({composite})" if method == "lrp" else method.replace("_", " ")
        figures["png"] = (
            out,
            plot.heatmap_pairs(
                pixels,
                heat,
                titles,
                signed=SIGNED[method],
                suptitle=f"{label}: red = evidence for the class, blue = against"
                if SIGNED[method]
                else label,
            ),
        )
        if method == "lrp" and layer:
            figures["layer_png"] = (
                out.with_name(out.stem + f"_{layer}.png"),
                _feature_map_figure(
                    model, params, x, target, layer, pixels[0], describe(0, False), method_options
                ),
            )
    written = {"npz": atomic_savez(out.with_suffix(".npz"), **arrays)}
    for key, (path, fig) in figures.items():
        written[key] = plot.save(fig, path)
    return written


def _chosen_inputs(model, params, method, n, indices, images, data_dir, data_source):
    """``(x, logits, labels, saved)``: the normalized inputs to explain, their logits, their labels
    (``-1`` for image files) and what identifies them in the ``.npz`` (indices or file names)."""
    if images is not None:
        raw = read_images(images, model.dataset)
        logits = np.asarray(predict(model, params, jnp.asarray(raw)))
        labels = np.full(len(raw), -1)
        return model.preprocess(raw), logits, labels, {"files": np.array([str(p) for p in images])}
    test_images, test_labels = load_dataset(
        model.dataset, "test", data_dir=data_dir, source=data_source, progress=False
    )
    logits_all = np.asarray(predict(model, params, jnp.asarray(test_images)))
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
    return model.preprocess(test_images[idx]), logits_all[idx], labels, saved


def _feature_map_figure(model, params, x, target, layer, pixels, title, lrp_options):
    """The relevance of ``layer``'s feature maps for the first image, ranked, with the rules and
    options (``lrp_options``, as passed to ``explain.lrp``) of the heatmaps beside it."""
    from lenet_jax import plot

    rule_options = {k: v for k, v in lrp_options.items() if k != "batch_size"}  # one image
    for key in ("low", "high"):
        if rule_options.get(key) is None:
            rule_options[key] = models.dataset_options(model)[key]
    rels = jax.jit(
        lambda p, v: explain.lrp_layerwise(
            models.explained(model, p), v, target=target, **rule_options
        )
    )(params, x[:1])
    maps = sorted(k for k, v in rels.items() if v.ndim == 4 and k != "input")
    if layer not in maps:
        raise ValueError(f"unknown layer {layer!r} for feature maps; choose one of {maps}")
    return plot.feature_map_relevance(
        np.asarray(rels[layer][0]), pixels, f"Relevance of {layer}'s feature maps, {title}, ranked"
    )


# The evaluated entries: every method, LRP once per composite ("lrp:NAME").
EVAL_OPTIONS = {
    "lrp": {"batch_size": 500},  # + the composite of each entry
    "saliency": {},
    "gradient_x_input": {},
    "smoothgrad": {"n_samples": 50, "batch_size": 10},
    "integrated_gradients": {"n_steps": 50, "batch_size": 10},
    "grad_cam": {},
    "score_cam": {"batch_size": 16},
    "occlusion": {"window": 4, "stride": 2, "batch_size": 10},
}


def evaluation_entries(methods: list[str], composites: list[str]) -> dict[str, tuple[str, dict]]:
    """Entry label -> (method, options), LRP expanded into one entry per composite."""
    entries = {}
    for name in methods:
        if name == "lrp":
            for comp in composites:
                entries[f"lrp:{comp}"] = ("lrp", {**EVAL_OPTIONS["lrp"], "composite": comp})
        else:
            entries[name] = (name, EVAL_OPTIONS[name])
    return entries


def evaluate_run(
    run_dir: str | Path,
    *,
    methods: list[str] | None = None,
    composites: list[str] | None = None,
    n: int = 1000,
    n_randomization: int = 100,
    patch: int = 2,
    n_steps: int = 32,
    out: str | Path | None = None,
    data_dir=None,
    data_source=None,
    progress: bool = True,
) -> dict:
    """Scores every method (and LRP composite) on ``n`` test images of a trained run.

    Writes ``evaluation.md``, ``evaluation.csv``, ``evaluation.json``, ``flipping_curves.png`` and
    ``randomization.png`` into ``out`` (default ``run_dir/evaluation``).

    Returns:
      The results dict (also in ``evaluation.json``).
    """
    import time

    from tqdm.auto import tqdm

    from lenet_jax import evaluate, plot
    from lenet_jax.io import atomic_write_bytes, atomic_write_json

    started = time.perf_counter()
    methods = list(explain.METHODS) if methods is None else methods
    composites = list(explain.COMPOSITES) if composites is None else composites
    bad = sorted(set(methods) - set(explain.METHODS)) + sorted(
        set(composites) - set(explain.COMPOSITES)
    )
    if bad:
        raise ValueError(
            f"unknown method or composite {bad[0]!r}; methods: "
            f"{sorted(explain.METHODS)}, composites: {sorted(explain.COMPOSITES)}"
        )
    out = Path(out) if out else Path(run_dir) / "evaluation"
    model, params, _ = checkpoint.load_params(run_dir)
    images, labels = load_dataset(
        model.dataset, "test", data_dir=data_dir, source=data_source, progress=False
    )
    x = model.preprocess(images[:n])
    target = jnp.argmax(models.explained(model, params)(x), axis=1).astype(jnp.int32)
    mesh = parallel.default_mesh()
    if mesh is not None:  # every jitted call below follows its inputs: batch split, params copied
        if n % mesh.size or n_randomization % mesh.size:
            raise ValueError(
                f"--n {n} and --n-randomization {n_randomization} must be multiples of the "
                f"{mesh.size} devices"
            )
        x, target = (parallel.make_global(a, parallel.batch_sharding(mesh)) for a in (x, target))
        params = parallel.replicate(params, mesh)
    xr, tr = x[:n_randomization], target[:n_randomization]
    flip = functools.partial(evaluate.pixel_flipping, model, patch=patch, n_steps=n_steps)
    flip = jax.jit(flip, static_argnames=("order",))
    faith = jax.jit(functools.partial(evaluate.faithfulness_correlation, model))

    rand_curves = flip(params, x, target, jnp.zeros(x.shape[:3]), order="random")
    random_summary = evaluate.summarize_curves(rand_curves)
    band = np.percentile(np.asarray(rand_curves["prob"]), [10, 90], axis=0)
    random_faith = float(
        faith(params, x, target, evaluate.random_attribution(x, jax.random.key(5))).mean()
    )

    entries = evaluation_entries(methods, composites)
    rows, curves, cascades, layers = [], {}, {}, None
    bar = tqdm(entries.items(), desc="evaluating", disable=not progress)
    for label, (name, options) in bar:
        bar.set_postfix_str(label)
        fn = jax.jit(attribution_fn(name, model, **options))
        compiled = fn.lower(params, x, target).compile()
        t0 = time.perf_counter()
        attr = jax.block_until_ready(compiled(params, x, target))
        ms = 1000 * (time.perf_counter() - t0) / n
        morf = flip(params, x, target, attr, order="morf")
        lerf = flip(params, x, target, attr, order="lerf")
        curves[label] = {
            "morf": evaluate.summarize_curves(morf),
            "lerf": evaluate.summarize_curves(lerf),
        }
        corr = float(faith(params, x, target, attr).mean())
        cascade = evaluate.randomization_cascade(model, params, xr, tr, fn)
        layers = cascade["layers"]
        cascades[label] = np.asarray(cascade["attributions"][:, 0])
        if name == "lrp":
            conservation = float(evaluate.conservation_error(model, params, x, target, attr).mean())
        elif name == "integrated_gradients":
            # completeness of the attribution already computed: f(x) − f(x0) − Σ IG
            f = target_logit(models.explained(model, params), target)
            black = jnp.asarray(models.dataset_options(model)["baseline"], x.dtype)
            delta = f(x) - f(jnp.broadcast_to(black, x.shape))
            gap = delta - attr.reshape(attr.shape[0], -1).sum(1)
            conservation = float((jnp.abs(gap) / jnp.maximum(jnp.abs(delta), 1e-12)).mean())
        else:
            conservation = None
        rows.append(
            {
                "method": label,
                "morf_aopc": curves[label]["morf"]["aopc"],
                "lerf_aopc": curves[label]["lerf"]["aopc"],
                "faithfulness_corr": corr,
                "randomization_similarity": float(cascade["similarity"][-1].mean()),
                "randomization_by_layer": [float(s) for s in cascade["similarity"].mean(1)],
                "conservation_error": conservation,
                "sparseness": float(evaluate.sparseness(attr).mean()),
                "ms_per_image": ms,
            }
        )
    results = {
        "n": n,
        "n_randomization": n_randomization,
        "patch": patch,
        "n_steps": n_steps,
        "random_morf_aopc": random_summary["aopc"],
        "random_faithfulness_corr": random_faith,
        "cascade_layers": layers,
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
    }
    atomic_write_json(out / "evaluation.json", results)
    atomic_write_bytes(out / "evaluation.csv", _csv(rows).encode())
    atomic_write_bytes(out / "evaluation.md", evaluation_markdown(results).encode())
    plot.save(plot.flipping_curves(curves, random_summary, band), out / "flipping_curves.png")
    plot.save(
        plot.randomization_cascade(
            np.asarray(to_pixels(xr[:1], model.dataset))[0], cascades, layers, SIGNED
        ),
        out / "randomization.png",
    )
    return results


COLUMNS = [
    "method",
    "morf_aopc",
    "lerf_aopc",
    "faithfulness_corr",
    "randomization_similarity",
    "conservation_error",
    "sparseness",
    "ms_per_image",
]


def _fmt(value) -> str:
    return "—" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def _csv(rows) -> str:
    lines = [",".join(COLUMNS)]
    lines += [",".join("" if r[c] is None else str(r[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines) + "\n"


def evaluation_markdown(results: dict) -> str:
    """The evaluation table in Markdown."""
    head = (
        "| method | MoRF AOPC ↑ | LeRF AOPC ↓ | faithfulness corr. ↑ | randomization sim. ↓ "
        "| conservation err. | sparseness (Gini) | ms / image |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |")
    lines.append(
        f"| random order / random attribution | {results['random_morf_aopc']:.3f} | "
        f"{results['random_morf_aopc']:.3f} | {results['random_faithfulness_corr']:.3f} "
        "| | | | |"
    )
    return "\n".join(lines) + "\n"
