"""Metrics of explanations: are they faithful to the model, do they pass the sanity checks?

Pure, batched functions of ``(f, x, target, attribution)``, ``f`` the model as every method takes
it (a function from a batch to logits); every perturbed input of a batch goes through ``f`` in
chunked, batched forward passes (``lax.map``), never a Python loop per image or per step.
Attributions may be ``[B, H, W, C]`` (summed over channels) or ``[B, H, W]``. What a metric needs to
know of the data comes from the caller: ``bounds=(low, high)``, the model's input range (the
normalized black and white pixel for images), for removing pixels by black or uniform noise.

* ``pixel_flipping`` — region perturbation (Samek et al., 2017): remove the most (MoRF) or least
  (LeRF) relevant patches first, or in random order; the curve of the target score and its AOPC.
* ``faithfulness_correlation`` — Bhatt et al. (2020): Pearson correlation between the attribution
  mass of random pixel subsets and the score drop when they are removed.
* ``randomization_cascade`` — Adebayo et al. (2018): replace the layers' parameters by fresh ones
  from the top down and compare each explanation with the original by Spearman rank correlation.
* ``sparseness`` (Gini index, Chalasani et al., 2020) and ``conservation_error``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from lenet_jax.explain.common import chunked_map

REPLACEMENTS = ("black", "mean", "uniform")
ORDERS = ("morf", "lerf", "random")


def _heat(attribution):
    """``[B, H, W]`` from ``[B, H, W, C]`` (channel sum) or ``[B, H, W]``."""
    return attribution.sum(-1) if attribution.ndim == 4 else attribution


def _fill(x, replacement, key, bounds):
    """The values that replace removed pixels, ``x.shape``."""
    if not isinstance(replacement, str):
        return jnp.broadcast_to(jnp.asarray(replacement, x.dtype), x.shape)
    if replacement == "mean":
        return jnp.broadcast_to(x.mean(axis=(1, 2, 3), keepdims=True), x.shape)
    if replacement not in REPLACEMENTS:
        raise ValueError(
            f"unknown replacement {replacement!r}; choose one of {list(REPLACEMENTS)} or pass an array"
        )
    if bounds is None:
        raise ValueError(
            f"replacement {replacement!r} needs bounds=(low, high), the model's input range "
            "(for the package's datasets: lenet_jax.data.normalized_range(name))"
        )
    low, high = (jnp.broadcast_to(jnp.asarray(v, x.dtype), x.shape) for v in bounds)
    if replacement == "black":
        return low
    return low + (high - low) * jax.random.uniform(key, x.shape, x.dtype)


def _scores(f, xs, target, batch_size):
    """Target logit and probability of ``xs [B, S, H, W, C]``: two ``[B, S]`` arrays."""
    b, s = xs.shape[:2]

    def chunk(a):
        xc, tc = a
        logits = f(xc.reshape(-1, *xc.shape[2:]))
        logits = logits.reshape(xc.shape[0], s, -1)
        probs = jax.nn.softmax(logits, axis=-1)
        pick = lambda v: jnp.take_along_axis(v, tc[:, None, None], axis=2)[..., 0]  # noqa: E731
        return pick(logits), pick(probs)

    return chunked_map(chunk, (xs, target), batch_size)


def pixel_flipping(
    f,
    x,
    target,
    attribution,
    *,
    order: str = "morf",
    patch: int = 1,
    n_steps: int = 32,
    replacement="black",
    bounds: tuple | None = None,
    key: jax.Array | None = None,
    batch_size: int | None = 10,
):
    """Region perturbation: the target score as patches are removed in order of relevance.

    Args:
      f: the model, ``x -> logits [B, K]``.
      x: inputs ``[B, H, W, C]``; ``target``: int ``[B]``.
      attribution: ``[B, H, W(, C)]``; a patch's relevance is the sum over its pixels.
      order: ``"morf"`` (most relevant first), ``"lerf"`` (least relevant first) or ``"random"``.
      patch: side of the square patches (``H`` and ``W`` must be multiples).
      n_steps: perturbation steps; step ``k`` has removed ``round(k/n_steps · P)`` of the P patches.
      replacement: ``"black"`` (``bounds[0]``, the normalized black pixel), ``"mean"`` (the image's
        mean value), ``"uniform"`` (uniform noise over ``bounds``), or an array broadcastable to
        ``x`` (a baseline of your own).
      bounds: ``(low, high)``, the model's input range; needed by ``"black"`` and ``"uniform"``.
      key: PRNG key for ``"random"`` order and ``"uniform"`` replacement (default ``key(0)``).
      batch_size: images per chunk of forward passes.

    Returns:
      Dict with ``logit`` and ``prob``: ``[B, n_steps + 1]`` target scores (step 0 = the clean
      input), ``fraction``: ``[n_steps + 1]`` fraction of patches removed, and ``aopc``: ``[B]`` the
      area over the perturbation curve of the probability, mean over steps of ``p_0 − p_k``.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {list(ORDERS)}")
    b, h, w, _ = x.shape
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"patch size {patch} must divide the image size {h}x{w}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    key = jax.random.key(0) if key is None else key
    k_order, k_fill = jax.random.split(key)
    ph, pw = h // patch, w // patch
    n_patches = ph * pw
    rel = _heat(attribution).reshape(b, ph, patch, pw, patch).sum(axis=(2, 4)).reshape(b, -1)
    if order == "random":
        keys = jax.random.split(k_order, b)
        ranking = jax.vmap(lambda k: jax.random.permutation(k, n_patches))(keys)
    else:
        ranking = jnp.argsort(-rel if order == "morf" else rel, axis=1)
    rank_of = jnp.argsort(ranking, axis=1)  # [B, P]: position of each patch in the order
    counts = jnp.round(jnp.linspace(0, n_patches, n_steps + 1)).astype(jnp.int32)  # [S+1]
    fill = _fill(x, replacement, k_fill, bounds)

    def chunk(args):
        xc, fc, rc, tc = args
        removed = (rc[:, None, :] < counts[None, :, None]).astype(x.dtype)  # [b, S+1, P]
        mask = removed.reshape(-1, n_steps + 1, ph, 1, pw, 1)
        mask = jnp.broadcast_to(mask, (mask.shape[0], n_steps + 1, ph, patch, pw, patch))
        mask = mask.reshape(-1, n_steps + 1, h, w, 1)
        xs = xc[:, None] * (1 - mask) + fc[:, None] * mask
        return _scores(f, xs, tc, None)

    logit, prob = chunked_map(chunk, (x, fill, rank_of, jnp.asarray(target)), batch_size)
    return {
        "logit": logit,
        "prob": prob,
        "fraction": counts / n_patches,
        "aopc": (prob[:, :1] - prob).mean(axis=1),
    }


def _pearson(a, b, axis=-1):
    a = a - a.mean(axis, keepdims=True)
    b = b - b.mean(axis, keepdims=True)
    denom = jnp.sqrt((a * a).sum(axis) * (b * b).sum(axis))
    return jnp.where(denom > 0, (a * b).sum(axis) / jnp.where(denom > 0, denom, 1.0), 0.0)


def spearman(a, b):
    """Spearman rank correlation of ``a`` and ``b`` per row (``[B, N]`` -> ``[B]``)."""
    rank = lambda v: jnp.argsort(jnp.argsort(v, axis=-1), axis=-1).astype(jnp.float32)  # noqa: E731
    return _pearson(rank(a), rank(b))


def faithfulness_correlation(
    f,
    x,
    target,
    attribution,
    *,
    subset_size: int = 128,
    n_runs: int = 100,
    replacement="black",
    bounds: tuple | None = None,
    key: jax.Array | None = None,
    batch_size: int | None = 10,
):
    """Faithfulness correlation (Bhatt et al., 2020), Quantus' ``FaithfulnessCorrelation``.

    For ``n_runs`` random subsets of ``subset_size`` pixels: the attribution mass of the subset and
    the drop of the target logit when the subset is replaced; their Pearson correlation per image.
    The subsets are drawn once per call and shared by its images (each image's correlation is still
    over ``n_runs`` independent draws); drawing them per image costs a sort per draw on the CPU.
    ``replacement`` and ``bounds`` as for ``pixel_flipping``.

    Returns:
      ``[B]`` correlations in [-1, 1] (higher = more faithful).
    """
    b, h, w, _ = x.shape
    n = h * w
    if not 1 <= subset_size <= n:
        raise ValueError(f"subset_size must be in [1, {n}], got {subset_size}")
    key = jax.random.key(0) if key is None else key
    k_sub, k_fill = jax.random.split(key)
    heat = _heat(attribution).reshape(b, n)
    # n_runs random subsets of exactly subset_size pixels (the largest of uniform draws), shared by
    # the images of the call: each image's correlation is over the same, independent draws.
    u = jax.random.uniform(k_sub, (n_runs, n))
    subsets = (u >= jax.lax.top_k(u, subset_size)[0][:, -1:]).astype(x.dtype)  # [R, N]
    mask = subsets.reshape(n_runs, h, w, 1)
    fill = _fill(x, replacement, k_fill, bounds)

    def chunk(args):
        xc, tc, hc, fc = args
        mass = hc @ subsets.T  # [b, R]
        removed = xc[:, None] * (1 - mask[None]) + fc[:, None] * mask[None]
        xs = jnp.concatenate([xc[:, None], removed], axis=1)
        logit, _ = _scores(f, xs, tc, None)
        return _pearson(mass, logit[:, :1] - logit[:, 1:])

    return chunked_map(chunk, (x, jnp.asarray(target), heat, fill), batch_size)


def sparseness(attribution):
    """Gini index of ``|attribution|`` per image (Chalasani et al., 2020): 0 = uniform, → 1 = one pixel.

    Returns:
      ``[B]``; an all-zero attribution gets 0.
    """
    a = jnp.sort(jnp.abs(_heat(attribution)).reshape(attribution.shape[0], -1), axis=1)
    n = a.shape[1]
    i = jnp.arange(1, n + 1, dtype=a.dtype)[None, :]
    total = a.sum(1)
    gini = ((2 * i - n - 1) * a).sum(1) / (n * jnp.where(total > 0, total, 1.0))
    return jnp.where(total > 0, gini, 0.0)


def conservation_error(f, x, target, attribution):
    """``|Σ attribution − logit[target]| / |logit[target]|`` per image (LRP's conservation)."""
    logits = f(x)
    z = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
    total = attribution.reshape(attribution.shape[0], -1).sum(1)
    return jnp.abs(total - z) / jnp.maximum(jnp.abs(z), 1e-12)


def layers_top_down(apply: Callable, params, x) -> list[str]:
    """The top-level entries of ``params`` (a dict: a Linen ``"params"`` collection), output layer
    first: ordered by where ``apply(params, x)`` first reads them, not by name (a ViT's ``pos`` comes
    after its ``embed`` and before ``block_0``)."""
    shapes = jax.eval_shape(lambda: params)
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    jaxpr = jax.make_jaxpr(apply)(shapes, spec).jaxpr
    first_read = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for var in eqn.invars:
            if not isinstance(var, jcore.Literal):
                first_read.setdefault(var, i)
    leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    order: dict[str, float] = {}
    for (path, _), var in zip(leaves, jaxpr.invars, strict=False):
        name = path[0].key
        order[name] = min(order.get(name, float("inf")), first_read.get(var, float("inf")))
    return sorted(order, key=lambda name: order[name], reverse=True)


def randomized(params, fresh, layers):
    """``params`` with the entries named in ``layers`` taken from ``fresh`` (cast to their dtype)."""
    missing = set(layers) - set(params)
    if missing:
        raise ValueError(f"no parameters named {sorted(missing)}; the model has {sorted(params)}")
    cast = lambda a, b: a.astype(b.dtype)  # noqa: E731
    return {
        name: jax.tree_util.tree_map(cast, fresh[name], p) if name in layers else p
        for name, p in params.items()
    }


def randomization_cascade(
    apply: Callable,
    params,
    fresh,
    x,
    target,
    explain_fn: Callable,
    *,
    absolute: bool = True,
):
    """Model-parameter randomization test (Adebayo et al., 2018), cascading from the top layer.

    Args:
      apply: ``(params, x) -> logits``, e.g. ``lambda p, x: model.apply({"params": p}, x)``; its
        trace orders the layers (``layers_top_down``).
      params: the trained parameters, a dict of layers; ``fresh``: the same tree re-initialized
        (``model.init(key, x)["params"]``).
      explain_fn: ``(params, x, target) -> attribution``.
      absolute: compare ``|attribution|`` (as Adebayo et al. and Quantus do by default).

    Returns:
      Dict with ``layers``: the names in cascade order, ``similarity``: ``[L, B]`` Spearman rank
      correlation with the original explanation after randomizing the top 1..L layers, and
      ``attributions``: ``[L + 1, B, H, W]`` (the original first). A faithful method's similarity
      falls towards 0 as the layers are randomized.
    """
    names = layers_top_down(apply, params, x)
    original = _heat(explain_fn(params, x, target))
    maps, sims = [original], []
    prep = (lambda a: jnp.abs(a)) if absolute else (lambda a: a)
    for k in range(1, len(names) + 1):
        heat = _heat(explain_fn(randomized(params, fresh, names[:k]), x, target))
        maps.append(heat)
        sims.append(
            spearman(prep(original).reshape(x.shape[0], -1), prep(heat).reshape(x.shape[0], -1))
        )
    return {"layers": names, "similarity": jnp.stack(sims), "attributions": jnp.stack(maps)}


def random_attribution(x, key: jax.Array):
    """A uniformly random attribution of ``x``'s shape: the baseline every method should beat."""
    return jax.random.uniform(key, x.shape, x.dtype)


def summarize_curves(curves: dict) -> dict[str, np.ndarray]:
    """Mean curve and AOPC over the batch, as numpy."""
    return {
        "fraction": np.asarray(curves["fraction"]),
        "prob": np.asarray(curves["prob"].mean(0)),
        "logit": np.asarray(curves["logit"].mean(0)),
        "aopc": float(curves["aopc"].mean()),
    }
