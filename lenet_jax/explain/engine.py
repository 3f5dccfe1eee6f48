"""The LRP engine: a traced graph grouped into layers, and the backward walk over them.

``plan(graph)`` groups the operations that depend on the input into *nodes*, the units a rule acts
on (the table is also in ``docs/lrp_rules.md``):

============================================  ==========================================
operations                                    node and rule
============================================  ==========================================
``conv_general_dilated`` / ``dot_general``    ``conv`` / ``dense``: the composite's rule
with one input-dependent operand, plus the    (ε, z⁺, αβ, γ, zᴮ, w², flat) on the merged
bias add and any affine chain after it        layer ``a ⊙ (W x) + c`` → kernel ``a ⊙ W``,
(BatchNorm in evaluation mode)                bias ``c`` (zennit's BatchNorm canonizer)
``reduce_window_sum``, ``reduce_sum`` (with   ``norm``: zennit's Norm rule
a following division: average pooling,
``jnp.mean``), ``add`` of two values from
different input-dependent sources (residual)
element-wise functions of one value (tanh,    ``pass``: relevance unchanged to that value
logistic, relu and ``max(x, c)``, gelu, silu,
elu, leaky relu, scaling by constants)
``reshape``, ``transpose``, slicing,          ``gradient``: the vector-Jacobian product
padding, concatenation, broadcasting,
``reduce_window_max`` / ``reduce_max``
(max pooling)
anything else                                 an error naming the operation and its layer
============================================  ==========================================

Nothing is guessed: a value that receives relevance and has no node is an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lenet_jax.explain.graph import Graph, Lit, Op, input_dependent, run_op, value

LINEAR = {"conv_general_dilated": "conv", "dot_general": "dense"}
SUMS = frozenset({"reduce_window_sum", "reduce_sum"})
STRUCTURAL = frozenset(
    {
        "reshape",
        "transpose",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "slice",
        "dynamic_slice",
        "gather",
        "pad",
        "concatenate",
        "rev",
        "reduce_max",
        "reduce_window_max",
        "copy",
        "copy_p",
        "reduce_precision",
    }
)
ELEMENTWISE = frozenset(
    {
        "tanh",
        "logistic",
        "exp",
        "exp2",
        "expm1",
        "log",
        "log1p",
        "erf",
        "erfc",
        "max",
        "min",
        "clamp",
        "select_n",
        "add",
        "sub",
        "mul",
        "div",
        "neg",
        "abs",
        "sign",
        "integer_pow",
        "pow",
        "square",
        "sqrt",
        "rsqrt",
        "convert_element_type",
        "ge",
        "gt",
        "le",
        "lt",
        "eq",
        "ne",
        "and",
        "or",
        "not",
    }
)
_AFFINE = ("add", "sub", "mul", "div")


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
    """One step of an affine chain after a node's primary op: ``v <- v (op) k`` (or ``k - v``).

    ``shape`` reshapes the constant ``k`` (read from ``ref``) to a form that varies only along the
    layer's output features (the operand of a ``broadcast_in_dim``), ``None`` to keep it as is.
    """

    op: str
    ref: Any
    left: bool  # the constant is the left operand
    shape: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Node:
    """Operations a rule treats as one layer.

    Attributes:
      kind: ``"conv"``, ``"dense"``, ``"norm"`` or ``"gradient"``.
      name: a linear node's layer name (module path, or ``"<kind>_<i>"`` when unnamed); ``""``
        for the other kinds.
      op: the primary operation.
      steps: the affine chain after it (bias, BatchNorm, a division by the pooling window).
      inputs: ids of the input-dependent operands of ``op``.
      output: id of the node's result.
      members: ids of every value inside the node (they share its output relevance).
    """

    kind: str
    name: str
    op: Op
    steps: tuple[Step, ...]
    inputs: tuple[int, ...]
    output: int
    members: tuple[int, ...]

    @property
    def is_linear(self) -> bool:
        return self.kind in ("conv", "dense")

    @property
    def x_pos(self) -> int:
        """Operand position of the input-dependent value (linear nodes)."""
        return next(i for i, r in enumerate(self.op.ins) if r == self.inputs[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """A graph grouped into nodes, ready for the backward walk.

    Attributes:
      graph: the traced graph.
      nodes: every node, in forward order.
      linear: the linear nodes, in forward order (what composites assign rules to).
      source: id of an element-wise value -> the value it is a function of (``pass``).
      layers: layer name -> id of that layer's output value (every scope and linear node).
      alias: id of a value inside a node -> the node's output.
      unsupported: id -> the op without a rule that produced it.
    """

    graph: Graph
    nodes: tuple[Node, ...]
    linear: tuple[Node, ...]
    source: Mapping[int, int]
    layers: Mapping[str, int]
    alias: Mapping[int, int]
    unsupported: Mapping[int, Op]


def plan(graph: Graph) -> Plan:
    """Groups the input-dependent operations of ``graph`` into nodes (see the module docstring)."""
    dep = input_dependent(graph)
    if graph.output not in dep:
        raise ValueError("the model's output does not depend on its input")
    consumers, producers = _consumers(graph), _producers(graph)
    nodes, source, unsupported, absorbed = [], {}, {}, set()
    for i, op in enumerate(graph.ops):
        dep_ins = tuple(r for r in op.ins if not isinstance(r, Lit) and r in dep)
        if i in absorbed or not dep_ins:
            continue
        sources = {source.get(r, r) for r in dep_ins}
        if op.name in LINEAR and len(dep_ins) == 1 and _linear_ok(op):
            kind = LINEAR[op.name]
            dims = _param_dims(graph, op, op.ins.index(dep_ins[0]))
            steps, ops = _chain(graph, i, consumers, producers, dep, dims)
        elif op.name in SUMS or (op.name == "add" and len(sources) == 2):
            kind = "norm"
            steps, ops = _chain(graph, i, consumers, producers, dep, None)
        elif op.name in STRUCTURAL:
            kind, steps, ops = "gradient", (), ()
        elif op.name in ELEMENTWISE and len(sources) == 1 and _same_shape(graph, op, dep_ins):
            source[op.outs[0]] = sources.pop()
            continue
        else:
            unsupported.update(dict.fromkeys(op.outs, op))
            continue
        absorbed.update(ops)
        members = (op.outs[0], *(graph.ops[j].outs[0] for j in ops))
        nodes.append(Node(kind, "", op, steps, tuple(dict.fromkeys(dep_ins)), members[-1], members))
    nodes = _name_linear(nodes)
    alias = {m: n.output for n in nodes for m in n.members}
    layers = {**{n.name: n.output for n in nodes if n.is_linear}, **_scope_outputs(graph, dep)}
    linear = tuple(n for n in nodes if n.is_linear)
    return Plan(graph, tuple(nodes), linear, source, layers, alias, unsupported)


def _consumers(graph: Graph) -> dict[int, list[int]]:
    """id -> indices of the ops that read it (the graph's output counts as one more reader)."""
    out: dict[int, list[int]] = {graph.output: [-1]}
    for j, op in enumerate(graph.ops):
        for r in dict.fromkeys(r for r in op.ins if not isinstance(r, Lit)):
            out.setdefault(r, []).append(j)
    return out


def _producers(graph: Graph) -> dict[int, Op]:
    """id -> the op that computes it."""
    return {v: op for op in graph.ops for v in op.outs}


def _same_shape(graph: Graph, op: Op, refs) -> bool:
    return all(graph.shapes[r].shape == graph.shapes[op.outs[0]].shape for r in refs)


def _linear_ok(op: Op) -> bool:
    if op.name == "dot_general":
        (_, _), (lb, _) = op.params["dimension_numbers"]
        return not lb
    return op.params.get("batch_group_count", 1) == 1


def _shape(graph: Graph, ref) -> tuple[int, ...]:
    return np.shape(ref.value) if isinstance(ref, Lit) else graph.shapes[ref].shape


def _param_dims(graph: Graph, op: Op, x_pos: int) -> frozenset[int]:
    """The output dims of a linear op that belong to its parameter (its output features)."""
    if op.name == "conv_general_dilated":
        return frozenset({op.params["dimension_numbers"].out_spec[1]})
    (lc, rc), _ = op.params["dimension_numbers"]
    lhs_free = len(_shape(graph, op.ins[0])) - len(lc)
    rhs_free = len(_shape(graph, op.ins[1])) - len(rc)
    if x_pos == 0:  # [x free dims..., W free dims...]
        return frozenset(range(lhs_free, lhs_free + rhs_free))
    return frozenset(range(lhs_free))


def _chain(graph, i, consumers, producers, dep, param_dims):
    """The affine steps that follow op ``i`` (each the only reader of the value before it).

    ``param_dims`` is ``None`` for a norm node (scaling steps only), else the output dims a scale
    may vary along so that it merges into the kernel.
    """
    steps, ops, cur = [], [], graph.ops[i].outs[0]
    while cur != graph.output and len(consumers.get(cur, ())) == 1:
        j = consumers[cur][0]
        op = graph.ops[j]
        other = [r for r in op.ins if r != cur]
        if op.name not in _AFFINE or len(other) != 1 or op.ins.count(cur) != 1:
            break
        if not isinstance(other[0], Lit) and other[0] in dep:
            break
        step = _step(graph, producers, op, cur, other[0], param_dims)
        if step is None:
            break
        steps.append(step)
        ops.append(j)
        cur = op.outs[0]
    return tuple(steps), tuple(ops)


def _step(graph, producers, op, cur, ref, param_dims) -> Step | None:
    """The chain step of ``op`` on the value ``cur`` and constant ``ref``, or ``None`` to stop."""
    left = op.ins.index(ref) == 0
    if op.name == "div" and left:
        return None  # k / v is not affine
    if param_dims is None:  # norm node: scaling only
        return Step(op.name, ref, left) if op.name in ("mul", "div") else None
    if op.name in ("add", "sub"):
        return Step(op.name, ref, left)
    merged = _mergeable(graph, producers, ref, graph.shapes[cur].shape, param_dims)
    if merged is None:
        return None
    ref, shape = merged
    return Step(op.name, ref, left, shape)


def _mergeable(graph, producers, ref, out_shape, param_dims):
    """``(ref, shape)`` of a scale that varies only along ``param_dims``, else ``None``.

    A scale broadcast to the full output (``broadcast_in_dim``) is read from before the broadcast.
    """
    shape = _shape(graph, ref)
    if len(shape) == 0:
        return ref, None
    if len(shape) == len(out_shape) and all(
        shape[d] == 1 for d in range(len(shape)) if d not in param_dims
    ):
        return ref, None
    producer = None if isinstance(ref, Lit) else producers.get(ref)
    if producer is None or producer.name != "broadcast_in_dim":
        return None
    small = [1] * len(out_shape)
    dims = producer.params["broadcast_dimensions"]
    for size, d in zip(_shape(graph, producer.ins[0]), dims, strict=True):
        small[d] = size
    if any(small[d] != 1 for d in range(len(small)) if d not in param_dims):
        return None
    return producer.ins[0], tuple(small)


def _name_linear(nodes: list[Node]) -> list[Node]:
    """Names the linear nodes by their innermost scope, or by kind and position (``dense_2``); a
    name used again (a module called twice) gets ``:1``, ``:2``, ... Other nodes stay unnamed."""
    out, seen, k = [], {}, 0
    for node in nodes:
        if node.is_linear:
            name = node.op.scope[-1] if node.op.scope else f"{node.kind}_{k}"
            seen[name] = seen.get(name, -1) + 1
            node = dataclasses.replace(node, name=f"{name}:{seen[name]}" if seen[name] else name)
            k += 1
        out.append(node)
    return out


def _scope_outputs(graph: Graph, dep) -> dict[str, int]:
    """Scope path -> the last input-dependent value made inside it and read outside it."""
    readers: dict[int, list[tuple[str, ...]]] = {}
    for op in graph.ops:
        for r in op.ins:
            if not isinstance(r, Lit):
                readers.setdefault(r, []).append(op.scope)
    out = {}
    for op in graph.ops:
        for v in op.outs:
            if v not in dep:
                continue
            for path in op.scope:
                outside = v == graph.output or any(path not in s for s in readers.get(v, ()))
                if outside:
                    out[path] = v
    return out


# --------------------------------------------------------------------------- evaluation of nodes


def merged_params(node: Node, env) -> dict[str, Any]:
    """``{"kernel", "bias"}`` of a linear node with its affine chain merged in.

    The chain makes the node ``a ⊙ (W x) + c``; the merged layer has kernel ``a ⊙ W`` (``a`` along
    the kernel's output-feature axis) and bias ``c`` (broadcastable to the output).
    """
    op = node.op
    kernel = value(env, op.ins[1 - node.x_pos])
    a, c = jnp.ones((), kernel.dtype), jnp.zeros((), kernel.dtype)
    for step in node.steps:
        k = value(env, step.ref)
        k = k.reshape(step.shape) if step.shape is not None else k
        if step.op == "add":
            c = c + k
        elif step.op == "sub":
            a, c = (-a, k - c) if step.left else (a, c - k)
        elif step.op == "mul":
            a, c = a * k, c * k
        else:
            a, c = a / k, c / k
    return {"kernel": _scale_kernel(op, node.x_pos, kernel, a), "bias": c}


def _scale_kernel(op: Op, x_pos: int, kernel, a):
    """``kernel`` with output feature ``f`` multiplied by ``a[..f..]`` (``a`` in output layout)."""
    if a.ndim == 0:
        return kernel * a
    shape = [1] * kernel.ndim
    if op.name == "conv_general_dilated":
        dn = op.params["dimension_numbers"]
        shape[dn.rhs_spec[0]] = a.shape[dn.out_spec[1]]
        return kernel * a.reshape(shape)
    (lc, rc), _ = op.params["dimension_numbers"]
    contract = rc if x_pos == 0 else lc
    free = [d for d in range(kernel.ndim) if d not in contract]
    # ``a`` has size 1 outside the parameter's output dims, which are the kernel's free dims in order
    pdims = [a.shape[d] for d in _kernel_out_dims(a.ndim, len(free), x_pos)]
    for d, size in zip(free, pdims, strict=True):
        shape[d] = size
    return kernel * a.reshape(shape)


def _kernel_out_dims(out_rank: int, n_free: int, x_pos: int) -> range:
    return range(out_rank - n_free, out_rank) if x_pos == 0 else range(n_free)


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """A node bound to one evaluation, with the ``apply(params, x)`` the rules call."""

    node: Node
    env: Mapping[int, Any]

    def apply(self, params, x):
        """Linear nodes: the op with ``params["kernel"]`` plus ``params["bias"]``, at input ``x``.
        Other nodes: the node's ops at the input-dependent operands ``x`` (a tuple)."""
        node, env = self.node, self.env
        if node.is_linear:
            args = [value(env, r) for r in node.op.ins]
            args[node.x_pos], args[1 - node.x_pos] = x, params["kernel"]
            return run_op(node.op, args)[0] + params["bias"]
        replace = dict(zip(node.inputs, x, strict=True))
        args = [replace[r] if r in replace else value(env, r) for r in node.op.ins]
        out = run_op(node.op, args)[0]
        for step in node.steps:
            k = value(env, step.ref)
            out = out * k if step.op == "mul" else out / k
        return out


# --------------------------------------------------------------------------- the backward walk


def walk(p: Plan, env, seed, rule_of: Callable[[Node], Any]) -> dict[int, Any]:
    """Propagates ``seed`` (the relevance at the graph's output) back to the input.

    Args:
      p: the plan.
      env: every value of one evaluation (``graph.evaluate``).
      seed: relevance at the output, the output's shape.
      rule_of: node -> the rule applied to it (``rule(layer, params, x, relevance)``).

    Returns:
      id -> relevance, for the input and every value relevance reached.

    Raises:
      ValueError: relevance reached an operation without a rule (the message names it and its layer).
    """
    graph = p.graph
    rel = {graph.output: seed}
    by_output = {n.output: n for n in p.nodes}

    def add(i, r):
        rel[i] = rel[i] + r if i in rel else r

    for op in reversed(graph.ops):
        for v in op.outs:
            if v not in rel:
                continue
            if v in by_output:
                _apply_node(by_output[v], env, rel[v], rule_of, add)
            elif v in p.source:
                add(p.source[v], rel[v])
            elif v in p.unsupported:
                raise ValueError(
                    f"no LRP rule for the operation {op.name!r} in {op.where}: LRP walks linear "
                    "layers, element-wise activations, pooling, sums and reshapes "
                    "(docs/lrp_rules.md)"
                )
    return rel


def _apply_node(node: Node, env, relevance, rule_of, add):
    layer = Layer(node, env)
    rule = rule_of(node)
    if node.is_linear:
        x = env[node.inputs[0]]
        add(node.inputs[0], rule(layer, merged_params(node, env), x, relevance))
        return
    xs = tuple(env[i] for i in node.inputs)
    for i, r in zip(node.inputs, rule(layer, None, xs, relevance), strict=True):
        add(i, r)


def relevance_at(p: Plan, rel: Mapping[int, Any], i: int):
    """The relevance of value ``i`` (a value inside a node shares the node's; zeros if none)."""
    i = p.alias.get(i, i)
    if i in rel:
        return rel[i]
    shape = p.graph.shapes[i]
    return jnp.zeros(shape.shape, shape.dtype)
