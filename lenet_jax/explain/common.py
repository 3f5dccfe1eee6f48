"""What every attribution method shares: argument checks, targets, the explained score, chunking."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def check_batch(x) -> None:
    """Raises ``ValueError`` unless ``x`` is a non-empty float array with a batch axis and, when its
    values are known (outside ``jax.jit``), finite: a NaN or inf input would make that sample's map
    NaN without a word. Under ``jit`` the values cannot be checked and such a sample's map is NaN."""
    if getattr(x, "ndim", 0) < 2:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"expected a batch of inputs [B, ...] (e.g. NHWC images), got {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"expected a float input (normalized pixels), got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"empty batch: x has shape {tuple(x.shape)}, nothing to explain")
    if not isinstance(x, jax.core.Tracer):
        bad = ~np.isfinite(np.asarray(x)).reshape(x.shape[0], -1).all(axis=1)
        if bad.any():
            raise ValueError(
                f"x holds NaN or inf values in {int(bad.sum())} sample(s), the first at index "
                f"{int(np.argmax(bad))}; their explanations would be NaN"
            )


def resolve_target(target, logits_BK):
    """The int32 ``[B]`` target classes.

    Args:
      target: ``None`` (the predicted class), an int, or an int array ``[B]``.
      logits_BK: the model's logits, for ``None`` and the range check (only their shape is read
        when ``target`` is given: a ``jax.ShapeDtypeStruct`` will do).

    Raises:
      ValueError: a target outside ``[0, K)`` or of the wrong length (checked when concrete).
    """
    b, k = logits_BK.shape
    if target is None:
        return jnp.argmax(logits_BK, axis=-1).astype(jnp.int32)
    t = jnp.asarray(target)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"target must be None, an int or an int array, got dtype {t.dtype}")
    if t.ndim == 0:
        t = jnp.full((b,), t)
    if t.shape != (b,):
        raise ValueError(f"target must be a scalar or have shape [{b}], got {tuple(t.shape)}")
    if not isinstance(t, jax.core.Tracer):
        values = np.asarray(t)
        if values.min() < 0 or values.max() >= k:
            bad = values[(values < 0) | (values >= k)][0]
            raise ValueError(f"target {bad} out of range: the model has classes 0..{k - 1}")
    return t.astype(jnp.int32)


def prepare(f: Callable, x, target):
    """Checks ``x`` and returns its ``[B]`` targets (``None`` -> ``f``'s predicted classes)."""
    check_batch(x)
    logits = f(x) if target is None else jax.eval_shape(f, x)
    if len(logits.shape) != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"the model must return logits [B, K], got shape {tuple(logits.shape)}")
    return resolve_target(target, logits)


def target_logit(f: Callable, target_B) -> Callable:
    """``x -> [B]`` the logit of each sample's target class (what the gradient methods explain)."""

    def score(x):
        return jnp.take_along_axis(f(x), target_B[:, None], axis=1)[:, 0]

    return score


def attribution_method(method: Callable) -> Callable:
    """Makes ``method(f, x, target=None, **options)`` return NaN maps for out-of-range targets.

    Outside ``jax.jit`` a target outside ``[0, K)`` is a ``ValueError`` (``resolve_target``). Under
    ``jit`` it cannot be checked, and a method would quietly explain nothing (all zeros) or, for
    Score-CAM, return a plausible-looking map; so every output of such a sample is set to NaN.
    """

    @functools.wraps(method)
    def run(f, x, target=None, **options):
        out = method(f, x, target, **options)
        if target is None or not isinstance(target, jax.core.Tracer):
            return out
        t = jnp.asarray(target)
        k = jax.eval_shape(f, x).shape[-1]
        valid = jnp.broadcast_to((t >= 0) & (t < k), (x.shape[0],))

        def mask(a):
            return jnp.where(valid.reshape(-1, *[1] * (a.ndim - 1)), a, jnp.nan)

        return jax.tree_util.tree_map(mask, out)

    return run


def chunked_map(fn, xs, chunk_size: int | None):
    """``fn`` over the leading axis of the pytree ``xs``, ``chunk_size`` at a time (``lax.map``)."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if not chunk_size or chunk_size >= n:
        return fn(xs)
    steps = -(-n // chunk_size)
    pad = steps * chunk_size - n

    def split(a):
        a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]) if pad else a
        return a.reshape(steps, chunk_size, *a.shape[1:])

    out = jax.lax.map(fn, jax.tree_util.tree_map(split, xs))
    return jax.tree_util.tree_map(lambda a: a.reshape(steps * chunk_size, *a.shape[2:])[:n], out)
