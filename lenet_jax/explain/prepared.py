"""A method prepared once for one model and one input shape: ``prepare(f, x_spec, method, **options)``.

``explainer(variables, x, target=None)`` runs one jitted program: the model is traced, the LRP
engine's plan made and the program compiled on the first call, for ``x_spec``'s shape; later calls
reuse it. A batch of another size is cut into batches of that size (the last padded), so it runs
the same program. The variables are arguments of the program, never constants folded into it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lenet_jax.explain.common import check_batch, resolve_target


def _model_function(f) -> Callable:
    """``(variables, x) -> logits`` of ``f``: the function itself, or an ``nnx.Module`` (whose
    variables are then ``nnx.state(model)``)."""
    from flax import nnx

    if isinstance(f, nnx.Module):
        graphdef = nnx.graphdef(f)
        return lambda state, x: nnx.merge(graphdef, state)(x)
    if not callable(f):
        raise ValueError(f"f must be a function (variables, x) -> logits, got {type(f).__name__}")
    return f


@dataclasses.dataclass(frozen=True, eq=False)
class Explainer:
    """``explainer(variables, x, target=None)``: the maps of ``method`` for ``x``, with ``target``
    ``None`` (the predicted classes), an int or an int array ``[B]``. Made by ``prepare``."""

    method: str
    options: Mapping[str, Any]
    x_spec: jax.ShapeDtypeStruct
    apply: Callable

    @functools.cached_property
    def _program(self):
        return jax.jit(self._explain)

    def _explain(self, variables, x, target):
        from lenet_jax.explain import attribute

        f = functools.partial(self.apply, variables)
        if target is not None:  # -1: the predicted class, computed only if some sample needs it
            target = jax.lax.cond(
                jnp.any(target < 0),
                lambda: jnp.where(target < 0, jnp.argmax(f(x), axis=-1), target).astype(jnp.int32),
                lambda: target,
            )
        return attribute(self.method, f, x, target, **self.options)

    def lower(self, variables, x=None, target=None):
        """The program (``jax.stages.Lowered``; ``.compile()`` compiles it ahead of the first call)
        for a batch ``x`` shaped like ``x_spec`` (default: ``x_spec``) and ``target`` (``None``:
        the predicted classes; else an int32 ``[B]`` array or its spec, placed like ``x``)."""
        return self._program.lower(variables, self.x_spec if x is None else x, target)

    def __call__(self, variables, x, target=None):
        shape, dtype = tuple(self.x_spec.shape[1:]), self.x_spec.dtype
        if tuple(getattr(x, "shape", ())[1:]) != shape or getattr(x, "dtype", None) != dtype:
            got = f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', type(x).__name__)}"
            raise ValueError(
                f"this explainer was prepared for inputs [B, {', '.join(map(str, shape))}] of "
                f"{dtype}, got {got}"
            )
        if _local(x):  # values on another host go unchecked
            check_batch(x)
        n, size = x.shape[0], self.x_spec.shape[0]
        if target is not None:
            target = self._targets(variables, target, n)
        if n == size:
            return self._program(variables, x, target)
        parts = []
        for i in range(0, n, size):
            xc = _padded(x[i : i + size], size)
            tc = None if target is None else _padded(target[i : i + size], size)
            parts.append(self._program(variables, xc, tc))
        return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a)[:n], *parts)

    def _targets(self, variables, target, n):
        """``target`` as int32 ``[n]``, checked as every method checks it (``resolve_target``)."""
        k = jax.eval_shape(self.apply, variables, self.x_spec).shape[-1]
        return resolve_target(target, jax.ShapeDtypeStruct((n, k), self.x_spec.dtype))


def _local(a) -> bool:
    """Whether ``a``'s values are all on this process (a tracer counts: it is checked by shape)."""
    return isinstance(a, jax.core.Tracer) or getattr(a, "is_fully_addressable", True)


def _padded(a, size):
    """``a`` with its last row repeated up to ``size`` rows."""
    pad = size - a.shape[0]
    return jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]) if pad else a


def prepare(f, x_spec, method: str = "lrp", **options) -> Explainer:
    """``method`` of ``lenet_jax.explain.METHODS`` prepared for model ``f`` and inputs like
    ``x_spec``: an ``Explainer``, called as ``explainer(variables, x, target=None)``.

    Args:
      f: ``(variables, x) -> logits [B, K]``, e.g. ``functools.partial(model.apply, train=False)``
        for a Linen model, or an ``nnx.Module`` in evaluation mode (``variables`` is then
        ``nnx.state(model)``).
      x_spec: an input batch or its ``jax.ShapeDtypeStruct``: the shape the program is compiled
        for. Batches of other sizes run in batches of this size.
      method: the method's name.
      **options: the method's keyword options (``explain.method_options(method)``).

    Raises:
      ValueError: an unknown method or option, or ``x_spec`` is not a float batch.
    """
    from lenet_jax.explain import method_options

    accepted = method_options(method)  # raises for an unknown method
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{method} takes no option {unknown[0]!r}; it takes {sorted(accepted)}")
    spec = jax.ShapeDtypeStruct(tuple(x_spec.shape), x_spec.dtype)
    if len(spec.shape) < 2 or spec.shape[0] < 1 or not jnp.issubdtype(spec.dtype, jnp.floating):
        raise ValueError(f"x_spec must be a float batch [B, ...], got {spec.shape} {spec.dtype}")
    return Explainer(method, dict(options), spec, _model_function(f))
