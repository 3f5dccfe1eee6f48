"""Argument checks and target handling shared by every attribution method."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax.data import normalized_range
from lenet_jax.layers import forward


def check_input(model, x) -> None:
    """Raises ``ValueError`` unless ``x`` is a float ``[B, *model.input_shape]`` batch."""
    expected = tuple(model.input_shape)
    if getattr(x, "ndim", None) != 4 or tuple(x.shape[1:]) != expected:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(
            f"expected a normalized NHWC batch of shape [B, {', '.join(map(str, expected))}], "
            f"got {shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"expected a float input (normalized pixels), got dtype {x.dtype}")


def logits_of(model, params, x):
    """``[B, K]`` logits of the model in evaluation mode."""
    return forward(model.layers, params, x)[0]


def resolve_target(target, logits_BK):
    """The int32 ``[B]`` target classes.

    Args:
      target: ``None`` (the predicted class), an int, or an int array ``[B]``.
      logits_BK: the model's logits, for ``None`` and the range check.

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


def target_logit(model, params, target_B):
    """``x -> [B]`` the logit of each sample's target class (for gradients)."""

    def f(x):
        logits = logits_of(model, params, x)
        return jnp.take_along_axis(logits, target_B[:, None], axis=1)[:, 0]

    return f


def black_like(model, x):
    """The black image of the model's dataset, normalized: ``x.shape`` and ``x.dtype``."""
    return jnp.broadcast_to(jnp.asarray(normalized_range(model.dataset)[0], x.dtype), x.shape)


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
