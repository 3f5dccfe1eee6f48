"""A model as a flat graph of primitive operations: traced once, evaluated by a small interpreter.

``trace(f, x)`` runs ``jax.make_jaxpr`` on ``f`` and inlines every call it can see into (``jit``,
``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``, ``closed_call``), so the graph is one list
of primitive ``Op``s over integer value ids. Each op keeps the *scope* it was traced in: the path of
the Linen or NNX module whose call made it, and any scope the user opened with ``jax.named_scope``.

Scopes come from the equations' name stacks read as data (``Scope`` entries; transforms such as
``vmap`` are not names), never from parsing their string. While tracing, every module call opens a
scope of its own whose name this module maps to the module's path: for Linen through
``nn.intercept_methods`` (so names do not depend on flax's named-call profiling flag), for NNX
through a profile hook of the tracing thread (``sys.setprofile``), which leaves the user's classes
untouched and other threads unaffected.

``evaluate`` is the interpreter of "Writing custom interpreters in JAX": it binds each primitive to
concrete or traced values, so ``jax.jit`` and ``jax.vmap`` compose with everything built on it. A
function with a custom derivative (``jax.nn.relu``, ``jax.nn.softmax``) is inlined for the engine
to read, and evaluated again as the call it was, so a gradient taken through ``evaluate`` is the
model's own (relu at 0 has derivative 0, not the 1 of the ``max`` inside it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax import lax
from jax.extend import core as jcore

from lenet_jax import cpu_kernels
from lenet_jax.explain.primitives import CALLS, CUSTOM_DERIVATIVES

# The prefix of the scope names opened for module calls while tracing (``_mark``).
_MARK = "lenet_jax.module."


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
class Call:
    """A call with a custom derivative, inlined into the graph and kept to be evaluated as a call.

    Attributes:
      prim: ``custom_jvp_call`` or ``custom_vjp_call``.
      params: its parameters (the body, the derivative rule).
      ins: operands (ids or ``Lit``), as for an ``Op``.
      outs: ids of its results (made inside the inlined body).
      inner: ids of every value made inside the body.
    """

    prim: Any
    params: Mapping[str, Any]
    ins: tuple
    outs: tuple[int, ...]
    inner: frozenset[int]

    def run(self, args) -> list:
        out = self.prim.bind(*args, **self.prim.get_bind_params(self.params))
        return list(out) if self.prim.multiple_results else [out]


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """A traced function of one array: ``ops`` in evaluation order over value ids.

    Attributes:
      ops: the primitive operations.
      input: id of the argument ``x``.
      output: id of the (single) result.
      consts: id -> value of the constants the function closes over (its parameters).
      shapes: id -> ``jax.ShapeDtypeStruct`` of every value.
      calls: index of an op -> the calls with a custom derivative whose body ends with that op.
    """

    ops: tuple[Op, ...]
    input: int
    output: int
    consts: Mapping[int, Any]
    shapes: Mapping[int, Any]
    calls: Mapping[int, tuple[Call, ...]] = dataclasses.field(default_factory=dict)


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

    marks: dict[str, str] = {}  # module path -> the scope name its calls open
    with _linen_scopes(marks), _nnx_scopes(f, marks), model_errors(f):
        # a new function each time: a trace cached by an earlier jit or eval_shape of ``f`` would
        # lack the module scopes
        closed = jax.make_jaxpr(lambda v: f(v))(x)
    if len(closed.jaxpr.invars) != 1 or len(closed.jaxpr.outvars) != 1:
        raise ValueError("the model must map one array to one array of logits [B, K]")
    builder = _Builder({mark: path for path, mark in marks.items()})
    consts = {builder.new(v): c for v, c in zip(closed.jaxpr.constvars, closed.consts, strict=True)}
    builder.env.update(zip(closed.jaxpr.constvars, consts, strict=True))
    x_id = builder.new(closed.jaxpr.invars[0])
    builder.env[closed.jaxpr.invars[0]] = x_id
    builder.inline(closed.jaxpr, ())
    out = builder.ref(closed.jaxpr.outvars[0])
    if isinstance(out, Lit) or out in consts:
        raise ValueError("the model's output does not depend on its input")
    # a nested call ends before (or with) the call around it, so it is listed first: evaluated in
    # this order, the outermost call's results, and derivative rule, are the ones that stay
    calls: dict[int, list[Call]] = {}
    for end, call in builder.calls:
        calls.setdefault(end, []).append(call)
    calls = {end: tuple(c) for end, c in calls.items()}
    return Graph(tuple(builder.ops), x_id, out, consts, builder.shapes, calls)


class _Builder:
    """Inlines a jaxpr and its calls into a flat list of ``Op``s over integer ids."""

    def __init__(self, paths: Mapping[str, str]):
        self.paths = paths  # scope mark -> module path
        self.ops: list[Op] = []
        self.env: dict[Any, Any] = {}
        self.shapes: dict[int, Any] = {}
        self.calls: list[tuple[int, Call]] = []

    def new(self, var) -> int:
        i = len(self.shapes)
        self.shapes[i] = jax.ShapeDtypeStruct(var.aval.shape, var.aval.dtype)
        return i

    def ref(self, atom):
        return Lit(atom.val) if isinstance(atom, jcore.Literal) else self.env[atom]

    def inline(self, jaxpr, stack: tuple):
        for eqn in jaxpr.eqns:
            entries = stack + tuple(eqn.source_info.name_stack.stack)
            ins = tuple(self.ref(a) for a in eqn.invars)
            body = CALLS.get(eqn.primitive.name)
            if body is not None and body in eqn.params:
                self._inline_call(eqn, ins, entries)
            elif eqn.primitive.name == "split":
                self._split(eqn, ins[0], entries)
            else:
                self.emit(eqn.primitive, eqn.params, ins, eqn.outvars, entries)

    def emit(self, prim, params, ins, outvars, entries):
        outs = tuple(self.new(v) for v in outvars)
        self.env.update(zip(outvars, outs, strict=True))
        self.ops.append(Op(prim, params, ins, outs, self.scope(entries)))

    def _inline_call(self, eqn, ins, entries):
        sub = eqn.params[CALLS[eqn.primitive.name]]
        jaxpr, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            self.env[var] = Lit(value)
        self.env.update(zip(jaxpr.invars, ins, strict=True))
        first, n_values = len(self.ops), len(self.shapes)
        self.inline(jaxpr, entries)
        for outer, inner in zip(eqn.outvars, jaxpr.outvars, strict=True):
            self.env[outer] = self.ref(inner)
        outs = tuple(self.env[v] for v in eqn.outvars)
        made = frozenset(range(n_values, len(self.shapes)))
        custom = eqn.primitive.name in CUSTOM_DERIVATIVES
        if custom and len(self.ops) > first and all(o in made for o in outs):
            self.calls.append((len(self.ops) - 1, Call(eqn.primitive, eqn.params, ins, outs, made)))

    def _split(self, eqn, operand, entries):
        """``split`` as one ``slice`` per part (the engine knows slices)."""
        axis, start = eqn.params["axis"], 0
        shape = eqn.invars[0].aval.shape
        for var, size in zip(eqn.outvars, eqn.params["sizes"], strict=True):
            begin = [0] * len(shape)
            end = list(shape)
            begin[axis], end[axis] = start, start + int(size)
            params = dict(start_indices=tuple(begin), limit_indices=tuple(end), strides=None)
            self.emit(lax.slice_p, params, (operand,), [var], entries)
            start += int(size)

    def scope(self, entries: tuple) -> tuple[str, ...]:
        """Full paths of the enclosing scopes, outermost first.

        ``entries`` is a name stack as data: transforms (``vmap``, ``jvp``) are skipped, and so are
        the scopes ``jnp.einsum`` opens (named by its spec, ``"bqd,bkd->bqk"``); a module mark sets
        the path to its module's; a scope flax opens for a module call (the entry just before that
        call's mark) is skipped; any other scope extends the current path.
        """
        names = [e.name for e in entries if type(e).__name__ != "Transform" and "->" not in e.name]
        paths, current = [], ""
        for k, name in enumerate(names):
            if name.startswith(_MARK):
                current = self.paths[name]
            elif k + 1 < len(names) and names[k + 1].startswith(_MARK):
                continue
            else:
                current = f"{current}/{name}" if current else name
            if current and (not paths or paths[-1] != current):
                paths.append(current)
        return tuple(paths)


def _mark(marks: dict[str, str], path: str) -> str:
    """The scope name that stands for module ``path`` in this trace (made on its first call)."""
    return marks.setdefault(path, f"{_MARK}{len(marks)}")


@contextlib.contextmanager
def _linen_scopes(marks: dict[str, str]):
    """While tracing, each Linen module call runs under a scope marking its path (``"block1/conv"``).

    ``nn.intercept_methods`` is thread-local: other threads' models are unaffected.
    """
    import flax.linen as nn

    def interceptor(next_fun, args, kwargs, context):
        with jax.named_scope(_mark(marks, "/".join(context.module.path))):
            return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


@contextlib.contextmanager
def _nnx_scopes(f, marks: dict[str, str]):
    """While tracing an ``nnx.Module``, each submodule's ``__call__`` runs under a scope marking its
    attribute path (``"block1/conv_a"``).

    NNX has no method interceptors; a profile hook of the tracing thread (``sys.setprofile``, chained
    to a Python hook already set; ``cProfile`` pauses meanwhile) opens the scope when a module of
    ``f``'s graph enters ``__call__`` and closes it on return. The user's classes are not modified
    and other threads are unaffected.
    """
    from flax import nnx

    if not isinstance(f, nnx.Module):
        yield
        return
    modules, codes = {}, set()
    for path, node in nnx.iter_graph(f):
        if isinstance(node, nnx.Module):
            modules.setdefault(id(node), "/".join(map(str, path)))
            code = getattr(type(node).__call__, "__code__", None)
            if code is not None:
                codes.add(code)
    opened: dict[Any, Any] = {}
    previous = sys.getprofile()  # restored on exit
    # a hook written in Python is chained; a C profiler (``cProfile.Profile``) cannot be called from
    # here: it pauses while the model is traced and is enabled again after
    chained = previous if callable(previous) else None
    resume = None if previous is None or chained is not None else getattr(previous, "enable", None)

    def hook(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            me = frame.f_locals.get("self")
            if me is not None and id(me) in modules:
                scope = jax.named_scope(_mark(marks, modules[id(me)]))
                scope.__enter__()
                opened[frame] = scope
        elif event == "return" and frame in opened:
            opened.pop(frame).__exit__(None, None, None)
        if chained is not None:
            chained(frame, event, arg)

    sys.setprofile(hook)
    try:
        yield
    finally:
        sys.setprofile(chained)
        if resume is not None:
            resume()
        for scope in reversed(list(opened.values())):
            scope.__exit__(None, None, None)


def value(env: Mapping[int, Any], ref):
    """The value of an operand: a literal's own value or ``env[ref]``."""
    return ref.value if isinstance(ref, Lit) else env[ref]


def run_op(op: Op, args) -> list:
    """Applies one op to its argument values (a convolution in the form ``cpu_kernels.bind``
    chooses); always a list of results."""
    out = cpu_kernels.bind(op.prim, args, op.params)
    return list(out) if op.prim.multiple_results else [out]


def evaluate(graph: Graph, x, overrides: Mapping[int, Any] | None = None) -> dict[int, Any]:
    """Every value of ``graph`` at input ``x``; a call with a custom derivative gives its results
    as the call (same values; the gradient through them is the call's rule).

    Args:
      graph: from ``trace``.
      x: the input (same shape and dtype as traced).
      overrides: id -> value used instead of computing that value (what Grad-CAM differentiates).

    Returns:
      id -> value for the input, the constants and every op's results.
    """
    overrides = overrides or {}
    env = {**graph.consts, graph.input: x}
    for j, op in enumerate(graph.ops):
        outs = run_op(op, [value(env, r) for r in op.ins])
        env.update(zip(op.outs, outs, strict=True))
        for call in graph.calls.get(j, ()):
            if not call.inner & overrides.keys():
                env.update(zip(call.outs, call.run([value(env, r) for r in call.ins]), strict=True))
        env.update((i, overrides[i]) for i in op.outs if i in overrides)
    return env


def lowered(f: Callable) -> Callable:
    """``f`` evaluated by this interpreter, so its convolutions take ``cpu_kernels``' CPU forms
    (traced again for each input shape); ``f`` itself when the forms are off or not on a CPU."""
    if not cpu_kernels.active():
        return f

    def run(x):
        graph = trace(f, x)
        return evaluate(graph, x)[graph.output]

    return run


def input_dependent(graph: Graph) -> set[int]:
    """Ids of the values that depend on the input."""
    dep = {graph.input}
    for op in graph.ops:
        if any(not isinstance(r, Lit) and r in dep for r in op.ins):
            dep.update(op.outs)
    return dep
