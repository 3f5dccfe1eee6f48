"""The evaluation of a trained run's explanations: every method and LRP composite scored on test
images, written as a table (Markdown, CSV, JSON) and two figures. The metrics are
``lenet_jax.explain.metrics``'; this module picks the inputs (a run's model, its dataset's test
images and bounds), runs the entries and writes the files."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax import checkpoint, explain, models, parallel
from lenet_jax.attribution import explainer
from lenet_jax.data import load_dataset, normalized_range, to_pixels
from lenet_jax.explain import metrics
from lenet_jax.explain.common import target_logit
from lenet_jax.io import atomic_write_bytes, atomic_write_json, locked_folder

# The evaluated entries: every method, LRP once per composite ("lrp:NAME"), with these options.
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
    """Entry label -> (method, options), LRP expanded into one entry per composite.

    Raises:
      ValueError: no entry, or an unknown method or composite (the message lists the choices).
    """
    bad = sorted(set(methods) - set(explain.METHODS)) + sorted(
        set(composites) - set(explain.COMPOSITES)
    )
    if bad:
        raise ValueError(
            f"unknown method or composite {bad[0]!r}; methods: "
            f"{sorted(explain.METHODS)}, composites: {sorted(explain.COMPOSITES)}"
        )
    entries = {}
    for name in methods:
        if name == "lrp":
            for comp in composites:
                entries[f"lrp:{comp}"] = ("lrp", {**EVAL_OPTIONS["lrp"], "composite": comp})
        else:
            entries[name] = (name, EVAL_OPTIONS[name])
    if not entries:
        raise ValueError(
            "nothing to evaluate: name at least one method (and, for lrp, one composite), or all"
        )
    return entries


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """The evaluated images of a run, their targets and the jitted metrics."""

    model: Any
    dataset: str  # the run's
    params: Any
    x: jax.Array  # normalized test images
    target: jax.Array  # the predicted classes
    xr: jax.Array  # the first images, for the randomization cascade
    tr: jax.Array
    flip: Any  # jitted metrics.pixel_flipping of (params, x, target, attribution)
    faith: Any  # jitted metrics.faithfulness_correlation of the same
    fresh: Any  # re-initialized parameters, for the randomization cascade


def evaluate_run(
    run_dir: str | Path,
    *,
    epoch: int | None = None,
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
    """Scores every method (and LRP composite) on the first ``n`` test images of a trained run
    (its newest checkpoint, or ``epoch``'s).

    Writes ``evaluation.md``, ``evaluation.csv``, ``evaluation.json``, ``flipping_curves.png`` and
    ``randomization.png`` into ``out`` (default ``run_dir/evaluation``), which is checked and locked
    before any work; nothing is written unless every entry was scored.

    Returns:
      The results dict (also in ``evaluation.json``); ``n`` is the number of images evaluated (at
      most the test set's size).
    """
    from tqdm import tqdm  # text bars on stderr, in a terminal and in a notebook alike

    started = time.perf_counter()
    methods = list(explain.METHODS) if methods is None else methods
    composites = list(explain.COMPOSITES) if composites is None else composites
    entries = evaluation_entries(methods, composites)
    out = Path(out) if out else Path(run_dir) / "evaluation"
    with locked_folder(out, "--out"):
        inputs = _inputs(run_dir, epoch, n, n_randomization, patch, n_steps, data_dir, data_source)
        random = _random_baselines(inputs)
        rows, curves, cascades, layers = [], {}, {}, None
        bar = tqdm(entries.items(), desc="evaluating", disable=not progress, file=sys.stderr)
        for label, (name, options) in bar:
            bar.set_postfix_str(label)
            row, curves[label], cascade = _score_entry(inputs, label, name, options)
            rows.append(row)
            cascades[label], layers = np.asarray(cascade["attributions"][:, 0]), cascade["layers"]
        results = {
            "n": int(inputs.x.shape[0]),
            "n_randomization": int(inputs.xr.shape[0]),
            "patch": patch,
            "n_steps": n_steps,
            "random_morf_aopc": random["summary"]["aopc"],
            "random_faithfulness_corr": random["faithfulness"],
            "cascade_layers": layers,
            "rows": rows,
            "seconds": time.perf_counter() - started,
            "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        }
        _write(out, results, curves, random, cascades, inputs)
    return results


def _inputs(run_dir, epoch, n, n_randomization, patch, n_steps, data_dir, data_source) -> _Inputs:
    """The run's model and the first ``n`` test images (fewer when the test set is smaller), their
    predicted classes, and the jitted metrics; with several devices, the batch split over them."""
    model, params, meta = checkpoint.load_params(run_dir, epoch)
    dataset = meta["dataset"]
    images, _ = load_dataset(dataset, "test", data_dir=data_dir, source=data_source, progress=False)
    x = models.model_input(model, dataset).preprocess(images[:n])
    n, n_randomization = x.shape[0], min(n_randomization, x.shape[0])
    target = jnp.argmax(models.explained(model, params)(x), axis=1).astype(jnp.int32)
    mesh = parallel.default_mesh()
    if mesh is not None:  # every jitted call follows its inputs: batch split, params copied
        if n % mesh.size or n_randomization % mesh.size:
            raise ValueError(
                f"--n {n} and --n-randomization {n_randomization} must be multiples of the "
                f"{mesh.size} devices"
            )
        x, target = (parallel.make_global(a, parallel.batch_sharding(mesh)) for a in (x, target))
        params = parallel.replicate(params, mesh)
    bounds = normalized_range(dataset)

    def flip(p, v, t, a, order):
        f = models.explained(model, p)
        return metrics.pixel_flipping(
            f, v, t, a, order=order, patch=patch, n_steps=n_steps, bounds=bounds
        )

    def faith(p, v, t, a):
        return metrics.faithfulness_correlation(models.explained(model, p), v, t, a, bounds=bounds)

    return _Inputs(
        model,
        dataset,
        params,
        x,
        target,
        x[:n_randomization],
        target[:n_randomization],
        jax.jit(flip, static_argnames=("order",)),
        jax.jit(faith),
        models.init_params(model, jax.random.key(1), dataset),
    )


def _random_baselines(inputs: _Inputs) -> dict[str, Any]:
    """What a random order and a random attribution score: the floor every method should beat."""
    x, target = inputs.x, inputs.target
    curves = inputs.flip(inputs.params, x, target, jnp.zeros(x.shape[:3]), order="random")
    noise = metrics.random_attribution(x, jax.random.key(5))
    return {
        "summary": metrics.summarize_curves(curves),
        "band": np.percentile(np.asarray(curves["prob"]), [10, 90], axis=0),
        "faithfulness": float(inputs.faith(inputs.params, x, target, noise).mean()),
    }


def _score_entry(inputs: _Inputs, label: str, name: str, options: dict):
    """``(row, curves, cascade)`` of one entry: its table row, its MoRF/LeRF curve summaries and its
    randomization cascade."""
    params, x, target = inputs.params, inputs.x, inputs.target
    fn = explainer(name, inputs.model, x, inputs.dataset, **options)
    compiled = fn.lower(params, x, target).compile()
    t0 = time.perf_counter()
    attr = jax.block_until_ready(compiled(params, x, target))
    ms = 1000 * (time.perf_counter() - t0) / x.shape[0]
    curves = {
        order: metrics.summarize_curves(inputs.flip(params, x, target, attr, order=order))
        for order in ("morf", "lerf")
    }
    apply = lambda p, v: models.explained(inputs.model, p)(v)  # noqa: E731
    fn_r = explainer(name, inputs.model, inputs.xr, inputs.dataset, **options)
    cascade = metrics.randomization_cascade(apply, params, inputs.fresh, inputs.xr, inputs.tr, fn_r)
    row = {
        "method": label,
        "morf_aopc": curves["morf"]["aopc"],
        "lerf_aopc": curves["lerf"]["aopc"],
        "faithfulness_corr": float(inputs.faith(params, x, target, attr).mean()),
        "randomization_similarity": float(cascade["similarity"][-1].mean()),
        "randomization_by_layer": [float(s) for s in cascade["similarity"].mean(1)],
        "conservation_error": _conservation(inputs, name, attr),
        "sparseness": float(metrics.sparseness(attr).mean()),
        "ms_per_image": ms,
    }
    return row, curves, cascade


def _conservation(inputs: _Inputs, name: str, attr) -> float | None:
    """Mean relative conservation gap of the methods that promise conservation: LRP (Σ R = logit)
    and Integrated Gradients (Σ IG = f(x) − f(black)); ``None`` for the others."""
    model, params, x, target = inputs.model, inputs.params, inputs.x, inputs.target
    if name == "lrp":
        f = models.explained(model, params)
        return float(metrics.conservation_error(f, x, target, attr).mean())
    if name != "integrated_gradients":
        return None
    f = target_logit(models.explained(model, params), target)
    black = jnp.asarray(models.dataset_options(inputs.dataset)["baseline"], x.dtype)
    delta = f(x) - f(jnp.broadcast_to(black, x.shape))
    gap = delta - attr.reshape(attr.shape[0], -1).sum(1)
    return float((jnp.abs(gap) / jnp.maximum(jnp.abs(delta), 1e-12)).mean())


def _write(out: Path, results, curves, random, cascades, inputs: _Inputs) -> None:
    from lenet_jax import plot

    atomic_write_json(out / "evaluation.json", results)
    atomic_write_bytes(out / "evaluation.csv", evaluation_csv(results["rows"]).encode())
    atomic_write_bytes(out / "evaluation.md", evaluation_markdown(results).encode())
    figure = plot.flipping_curves(curves, random["summary"], random["band"])
    plot.save(figure, out / "flipping_curves.png")
    pixels = np.asarray(to_pixels(inputs.xr[:1], inputs.dataset))[0]
    layers = results["cascade_layers"]
    plot.save(
        plot.randomization_cascade(pixels, cascades, layers, explain.SIGNED),
        out / "randomization.png",
    )


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


def evaluation_csv(rows) -> str:
    """The evaluation table as CSV (empty cells for metrics a method has none of)."""
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
