"""A model as a flat graph of primitive operations: traced once, evaluated by a small interpreter.

``trace(f, x)`` runs ``jax.make_jaxpr`` on ``f`` and inlines every call it can see into (``jit``,
``custom_jvp_call``, ``custom_vjp_call``, ``remat``, ``closed_call``), so the graph is one list of
primitive ``Op``s over integer value ids. Each op keeps the *scope* it was traced in: the module
path a Linen module puts on its equations (``jax.named_scope``), the attribute path of an NNX
module (set here while tracing), or a scope the user opened with ``jax.named_scope``.

``evaluate`` is the interpreter of "Writing custom interpreters in JAX": it binds each primitive to
concrete or traced values, so ``jax.jit`` and ``jax.vmap`` compose with everything built on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.extend import core as jcore

# Call primitives whose body is walked into, and the parameter holding that body.
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}
_NNX_MARK = "__nnx"


@dataclasses.dataclass(frozen=True)
class Lit:
    """A literal operand (a constant written into the equation)."""

    value: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
    """One primitive application: ``outs = prim.bind(*ins, **params)``.

    Attributes:
      prim: the JAX primitive.
      params: its parameters.
      ins: value ids (ints) or ``Lit`` literals.
      outs: value ids of the results.
      scope: the enclosing scopes, outermost first, each a full path (``("block1",
        "block1/conv_a")``); empty at the top level.
    """

    prim: Any
    params: Mapping[str, Any]
    ins: tuple
    outs: tuple[int, ...]
    scope: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.prim.name

    @property
    def where(self) -> str:
        """``"layer 'conv2'"`` or ``"the top level"``, for messages."""
        return f"layer {self.scope[-1]!r}" if self.scope else "the top level"


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """A traced function of one array: ``ops`` in evaluation order over value ids.

    Attributes:
      ops: the primitive operations.
      input: id of the argument ``x``.
      output: id of the (single) result.
      consts: id -> value of the constants the function closes over (its parameters).
      shapes: id -> ``jax.ShapeDtypeStruct`` of every value.
    """

    ops: tuple[Op, ...]
    input: int
    output: int
    consts: Mapping[int, Any]
    shapes: Mapping[int, Any]


def trace(f: Callable, x) -> Graph:
    """Traces ``f(x)`` to a flat ``Graph``.

    Args:
      f: maps one array to one array; a Linen ``functools.partial(module.apply, variables)``, an
        ``nnx.Module``, or any JAX function.
      x: an example input (its shape and dtype matter; a tracer is fine).

    Raises:
      ValueError: ``f`` does not return a single array.
    """
    from lenet_jax.explain.common import model_errors

    with _nnx_scopes(f) as nnx_paths, model_errors(f):
        # a new function each time: a trace cached by an earlier jit or eval_shape of ``f`` would
        # lack the NNX scopes
        closed = jax.make_jaxpr(lambda v: f(v))(x)
    if len(closed.jaxpr.invars) != 1 or len(closed.jaxpr.outvars) != 1:
        raise ValueError("the model must map one array to one array of logits [B, K]")
    builder = _Builder(_root_name(f), nnx_paths)
    consts = {builder.new(v): c for v, c in zip(closed.jaxpr.constvars, closed.consts, strict=True)}
    builder.env.update(zip(closed.jaxpr.constvars, consts, strict=True))
    x_id = builder.new(closed.jaxpr.invars[0])
    builder.env[closed.jaxpr.invars[0]] = x_id
    builder.inline(closed.jaxpr, ())
    out = builder.ref(closed.jaxpr.outvars[0])
    if isinstance(out, Lit) or out in consts:
        raise ValueError("the model's output does not depend on its input")
    return Graph(tuple(builder.ops), x_id, out, consts, builder.shapes)


class _Builder:
    """Inlines a jaxpr and its calls into a flat list of ``Op``s over integer ids."""

    def __init__(self, root: str | None, nnx_paths: Mapping[str, str]):
        self.root, self.nnx_paths = root, nnx_paths
        self.ops: list[Op] = []
        self.env: dict[Any, Any] = {}
        self.shapes: dict[int, Any] = {}

    def new(self, var) -> int:
        i = len(self.shapes)
        self.shapes[i] = jax.ShapeDtypeStruct(var.aval.shape, var.aval.dtype)
        return i

    def ref(self, atom):
        return Lit(atom.val) if isinstance(atom, jcore.Literal) else self.env[atom]

    def inline(self, jaxpr, stack: tuple[str, ...]):
        for eqn in jaxpr.eqns:
            names = stack + _split_stack(str(eqn.source_info.name_stack))
            ins = tuple(self.ref(a) for a in eqn.invars)
            body = _CALLS.get(eqn.primitive.name)
            if body is not None and body in eqn.params:
                self._inline_call(eqn.params[body], ins, eqn.outvars, names)
                continue
            outs = tuple(self.new(v) for v in eqn.outvars)
            self.env.update(zip(eqn.outvars, outs, strict=True))
            self.ops.append(Op(eqn.primitive, eqn.params, ins, outs, self.scope(names)))

    def _inline_call(self, sub, ins, outvars, names):
        jaxpr, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            self.env[var] = Lit(value)
        self.env.update(zip(jaxpr.invars, ins, strict=True))
        self.inline(jaxpr, names)
        for outer, inner in zip(outvars, jaxpr.outvars, strict=True):
            self.env[outer] = self.ref(inner)

    def scope(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Full paths of the enclosing modules, outermost first.

        A Linen partial's root class name is dropped, and so are the scopes Linen opens for method
        calls (``"Model.helper"``); NNX marks become attribute paths.
        """
        if self.root is not None and names and names[0] == self.root:
            names = names[1:]
        paths, current = [], ""
        for name in names:
            if "." in name:  # a Linen method's scope ("Model.helper"), not a module path
                continue
            if name.startswith(_NNX_MARK):
                current = self.nnx_paths.get(name, current)
            else:
                current = f"{current}/{name}" if current else name
            if not paths or paths[-1] != current:
                paths.append(current)
        return tuple(paths)


def _split_stack(stack: str) -> tuple[str, ...]:
    return tuple(part for part in stack.split("/") if part)


def _root_name(f) -> str | None:
    """The class name a Linen ``partial(module.apply, variables)`` puts first on every scope."""
    import flax.linen as nn

    func = f.func if isinstance(f, functools.partial) else f
    module = getattr(func, "__self__", None)
    return type(module).__name__ if isinstance(module, nn.Module) else None


@contextlib.contextmanager
def _nnx_scopes(f):
    """While tracing an ``nnx.Module``, each submodule call runs under a scope naming its path.

    NNX puts no names on equations, so every module class in ``f``'s graph gets a ``__call__`` that
    opens ``jax.named_scope("__nnx<i>")``; ``_Builder.scope`` maps the marks to attribute paths
    (``"block1/conv_a"``). The classes are restored on exit.
    """
    from flax import nnx

    if not isinstance(f, nnx.Module):
        yield {}
        return
    marks, paths, classes = {}, {}, set()
    for path, node in nnx.iter_graph(f):
        if not isinstance(node, nnx.Module):
            continue
        classes.add(type(node))
        if path and id(node) not in marks:
            marks[id(node)] = f"{_NNX_MARK}{len(marks)}"
            paths[marks[id(node)]] = "/".join(map(str, path))
    saved = {cls: cls.__dict__.get("__call__") for cls in classes}

    def scoped(call):
        @functools.wraps(call)
        def wrapper(self, *args, **kwargs):
            mark = marks.get(id(self))
            with jax.named_scope(mark) if mark else contextlib.nullcontext():
                return call(self, *args, **kwargs)

        return wrapper

    try:
        for cls in classes:
            cls.__call__ = scoped(cls.__call__)
        yield paths
    finally:
        for cls, call in saved.items():
            if call is None:
                del cls.__call__
            else:
                cls.__call__ = call


def value(env: Mapping[int, Any], ref):
    """The value of an operand: a literal's own value or ``env[ref]``."""
    return ref.value if isinstance(ref, Lit) else env[ref]


def run_op(op: Op, args) -> list:
    """Applies one op to its argument values; always a list of results."""
    out = op.prim.bind(*args, **op.params)
    return list(out) if op.prim.multiple_results else [out]


def evaluate(graph: Graph, x, overrides: Mapping[int, Any] | None = None) -> dict[int, Any]:
    """Every value of ``graph`` at input ``x``.

    Args:
      graph: from ``trace``.
      x: the input (same shape and dtype as traced).
      overrides: id -> value used instead of computing that value (what Grad-CAM differentiates).

    Returns:
      id -> value for the input, the constants and every op's results.
    """
    overrides = overrides or {}
    env = {**graph.consts, graph.input: x}
    for op in graph.ops:
        outs = run_op(op, [value(env, r) for r in op.ins])
        for i, out in zip(op.outs, outs, strict=True):
            env[i] = overrides.get(i, out)
    return env


def input_dependent(graph: Graph) -> set[int]:
    """Ids of the values that depend on the input."""
    dep = {graph.input}
    for op in graph.ops:
        if any(not isinstance(r, Lit) and r in dep for r in op.ins):
            dep.update(op.outs)
    return dep
