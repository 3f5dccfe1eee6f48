"""What every attribution method shares: argument checks, targets, the explained score, chunking."""

from __future__ import annotations

import contextlib
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
    if not isinstance(t, jax.core.Tracer) and getattr(t, "is_fully_addressable", True):
        values = np.asarray(t)
        if values.min() < 0 or values.max() >= k:
            bad = values[(values < 0) | (values >= k)][0]
            raise ValueError(f"target {bad} out of range: the model has classes 0..{k - 1}")
    return t.astype(jnp.int32)


def prepare(f: Callable, x, target):
    """Checks ``x`` and ``f``; returns ``f`` as the methods run it (``graph.lowered``: in the CPU
    forms of ``lenet_jax.cpu_kernels`` where they apply) and the ``[B]`` targets (``None`` ->
    ``f``'s predicted classes)."""
    from lenet_jax.explain.graph import lowered

    check_batch(x)
    with model_errors(f):
        logits = jax.eval_shape(f, x)
    check_logits(logits, x)
    fast = lowered(f)
    return fast, resolve_target(target, fast(x) if target is None else logits)


def check_logits(logits, x) -> None:
    """Raises a one-line ``ValueError`` unless ``logits`` is one array ``[B, K]`` for ``x [B, ...]``."""
    if not hasattr(logits, "shape"):
        raise ValueError(
            f"the model must return one array of logits [B, K], got a {type(logits).__name__}"
        )
    if len(logits.shape) != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"the model must return logits [B, K] for a batch of {x.shape[0]}, got shape "
            f"{tuple(logits.shape)}"
        )


def check_batch_size(batch_size) -> None:
    """``None`` or a positive int, else a one-line ``ValueError``."""
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be None or a positive integer, got {batch_size!r}")


@contextlib.contextmanager
def model_errors(f: Callable):
    """Calling the model: its mistakes a user can fix, as one-line ``ValueError``s. An NNX model
    in training mode, or a Linen model whose ``__call__`` trains by default (it updates
    ``batch_stats``) or needs an argument, says what to pass."""
    _check_nnx_eval(f)
    import flax.errors

    try:
        yield
    except flax.errors.ModifyScopeVariableError as e:
        raise ValueError(
            "the model tried to update a variable collection, i.e. it runs in training mode: "
            "pass its evaluation mode, e.g. functools.partial(model.apply, variables, train=False) "
            f"({str(e).splitlines()[0]})"
        ) from None
    except TypeError as e:
        if "required" not in str(e) or "argument" not in str(e):
            raise
        raise ValueError(
            f"calling the model with x alone failed ({str(e).splitlines()[0]}): bind its other "
            "arguments, e.g. functools.partial(model.apply, variables, train=False)"
        ) from None


def _check_nnx_eval(f) -> None:
    from flax import nnx

    if not isinstance(f, nnx.Module):
        return
    for path, node in nnx.iter_graph(f):
        training = (isinstance(node, nnx.Dropout) and not node.deterministic) or (
            isinstance(node, nnx.BatchNorm) and not node.use_running_average
        )
        if training:
            where = "/".join(map(str, path)) or type(node).__name__
            raise ValueError(
                f"the NNX model is in training mode ({where}): call model.eval() before "
                "explaining it"
            )


def target_logit(f: Callable, target_B) -> Callable:
    """``x -> [B]`` the logit of each sample's target class (what the gradient methods explain)."""

    def score(x):
        return jnp.take_along_axis(f(x), target_B[:, None], axis=1)[:, 0]

    return score


def attribution_method(method: Callable) -> Callable:
    """Makes ``method(f, x, target=None, **options)`` return NaN maps for out-of-range targets
    and non-finite inputs, and checks ``batch_size``.

    Outside ``jax.jit`` a target outside ``[0, K)`` or a NaN/inf input is a ``ValueError``
    (``resolve_target``, ``check_batch``). Under ``jit`` they cannot be checked, and a method would
    quietly explain nothing (all zeros), or return finite maps (saliency and occlusion of a NaN
    input) or, for Score-CAM, a plausible-looking one; so every output of such a sample is NaN.
    """

    @functools.wraps(method)
    def run(f, x, target=None, **options):
        check_batch_size(options.get("batch_size"))
        try:
            out = method(f, x, target, **options)
        except jax.errors.JaxRuntimeError as e:
            text = str(e)
            if not any(k in text for k in ("RESOURCE_EXHAUSTED", "Error dispatching", "memory")):
                raise
            fits = max(1, (options.get("batch_size") or x.shape[0]) // 4)
            raise MemoryError(
                f"{method.__name__} ran out of memory on a batch of {x.shape[0]}: pass a smaller "
                f"batch_size, e.g. batch_size={fits} ({text.splitlines()[0][:120]})"
            ) from None
        checks = []
        if isinstance(x, jax.core.Tracer):  # NaN or inf in a sample: its map is NaN
            checks.append(jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1))
        if target is not None and isinstance(target, jax.core.Tracer):
            t = jnp.asarray(target)
            k = jax.eval_shape(f, x).shape[-1]
            checks.append(jnp.broadcast_to((t >= 0) & (t < k), (x.shape[0],)))
        if not checks:
            return out
        valid = functools.reduce(jnp.logical_and, checks)

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


# The memory a method's batch may use by default: a batch whose working set would exceed it is
# split into chunks (``lax.map``) that fit. Change it here, or pass ``batch_size``.
MEMORY_BUDGET = 4 << 30  # bytes


def activation_bytes(f: Callable, x) -> int:
    """Bytes of every value ``f`` computes for one sample of ``x`` (its activations)."""
    from lenet_jax.explain.graph import trace

    one = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
    graph = trace(f, one)
    return sum(
        int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
        for i, s in graph.shapes.items()
        if i not in graph.consts
    )


def auto_batch_size(f: Callable, x, copies: int, batch_size: int | None) -> int | None:
    """``batch_size`` if given, else the chunk that keeps a method's working set (``copies``
    forward and backward passes per sample, e.g. SmoothGrad's noisy copies) within
    ``MEMORY_BUDGET``, the batch split into equal chunks; ``None`` when the whole batch fits."""
    if batch_size is not None:
        return batch_size
    per_sample = 3 * copies * max(activation_bytes(f, x), 1)  # forward, residuals, gradients
    fits = max(1, MEMORY_BUDGET // per_sample)
    if fits >= x.shape[0]:
        return None
    steps = -(-x.shape[0] // fits)
    return -(-x.shape[0] // steps)  # equal chunks: the last one is padded as little as possible
