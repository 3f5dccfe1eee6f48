"""The LRP engine: a traced graph grouped into nodes, and the backward walk over them.

``plan(graph)`` groups the operations that depend on the input into *nodes*, the units a rule acts
on. Each node has a *kind*; a composite gives each kind a rule (the table is also in
``docs/lrp_rules.md``):

=============================================  ================  ================================
operations                                     kind              rule (zennit / AttnLRP)
=============================================  ================  ================================
``conv_general_dilated`` / ``dot_general``     ``conv``,         the composite's (ε, z⁺, αβ, γ,
with one input-dependent operand, its bias     ``dense``         zᴮ, w², flat) on the merged
and (``merge="chain"``) any affine chain                         layer ``a ⊙ (W x) + c``
after it, e.g. BatchNorm
``dot_general`` of two input-dependent         ``product``       uniform: half the relevance to
operands (q·kᵀ, A·v), ``mul`` of two                             each operand (CP-LRP: all of it
values from different sources (a gate)                           to the value, none to the gate)
``exp(x − max) / Σ exp(x − max)``              ``softmax``       exact: ``x ⊙ (R − s ΣR)``
``v ⊙ g(reductions of v)``: LayerNorm,         ``normalize``     exact, with the statistic held
RMSNorm, written any way (the statistic                          constant (AttnLRP's identity
``g`` held constant), scale and bias                             rule)
``reduce_window_sum``, ``reduce_sum`` (with    ``sum``           zennit's Norm rule / the exact
a following division: average pooling,                           proportional split
means), ``add``/``sub`` of two values
from different sources (residuals)
element-wise functions of one value (tanh,     ``elementwise``   pass: relevance unchanged
relu, gelu, silu, a mask)
scaling or shifting one value by constants     ``affine``        pass / exact (a position
(not merged into a layer)                                        embedding takes its share)
``reshape``, ``transpose``, slicing,           ``structural``    the vector-Jacobian product
padding, concatenation, broadcasting,
max pooling
anything else                                  —                 an error naming the operation
=============================================  ================  ================================

"Exact" is the gradient × input rule in relevance form, ``R_in = x ⊙ Jᵀ(R / z)`` with no
stabilizer, which is what LXT's AttnLRP computes by modifying gradients. Nothing is guessed: a value
that receives relevance and has no node is an error.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lenet_jax.explain.graph import Graph, Lit, Op, input_dependent, run_op, value
from lenet_jax.explain.primitives import (
    AFFINE,
    CENTRING,
    ELEMENTWISE,
    IDENTITY,
    LINEAR,
    REDUCTIONS,
    SHIFT,
    STRUCTURAL,
    SUM_TO_DIVISION,
    SUMS,
)

MERGES = ("chain", "bias")
KINDS = (
    "conv", "dense", "product", "softmax", "normalize", "sum", "elementwise", "affine", "structural"
)  # fmt: skip


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
    """Operations a rule treats as one unit.

    Attributes:
      kind: one of ``KINDS``.
      name: the node's name: a linear node's module path (or ``"<kind>_<i>"`` when unnamed), else
        ``"<scope>/<kind>"``; ``:1``, ``:2``, ... on repeats.
      op: the primary operation (a linear node's matmul or convolution; else the last operation).
      inputs: ids of the input-dependent values the node reads.
      output: id of the node's result.
      members: ids of every value inside the node (they share its output relevance).
      steps: a linear node's affine chain after ``op`` (bias, BatchNorm).
      ops: a non-linear node's operations in forward order, from ``inputs`` to ``output``.
      frozen: ids of values held at their evaluated value (a normalization's statistic).
      weights: a product's operand that CP-LRP holds constant (an attention or a gate), or ``None``.
    """

    kind: str
    name: str
    op: Op
    inputs: tuple[int, ...]
    output: int
    members: tuple[int, ...]
    steps: tuple[Step, ...] = ()
    ops: tuple[Op, ...] = ()
    frozen: frozenset = frozenset()
    weights: int | None = None

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
      layers: layer name -> id of that layer's output value (every scope and node).
      alias: id of a value inside a node -> the node's output.
      unsupported: id -> ``(op, reason)`` for a value made by an operation without a rule.
    """

    graph: Graph
    nodes: tuple[Node, ...]
    linear: tuple[Node, ...]
    layers: Mapping[str, int]
    alias: Mapping[int, int]
    unsupported: Mapping[int, tuple[Op, str]]


_NO_RULE = (
    "LRP walks linear layers, element-wise activations, pooling, sums, products, softmax, "
    "normalizations and reshapes (docs/lrp_rules.md)"
)


@dataclasses.dataclass(frozen=True, eq=False)
class _View:
    """What planning reads of a graph: dependence on the input, readers, producers."""

    graph: Graph
    dep: frozenset
    consumers: Mapping[int, list[int]]
    producer: Mapping[int, int]  # id -> index of the op that computes it
    statistic: Mapping[int, bool]  # dep id -> computed from the input only through reductions

    def op_of(self, v) -> Op | None:
        j = None if isinstance(v, Lit) else self.producer.get(v)
        return None if j is None else self.graph.ops[j]

    def dep_ins(self, op: Op) -> tuple[int, ...]:
        return tuple(dict.fromkeys(r for r in op.ins if not isinstance(r, Lit) and r in self.dep))


def _view(graph: Graph) -> _View:
    dep = input_dependent(graph)
    producer = {v: j for j, op in enumerate(graph.ops) for v in op.outs}
    statistic = {graph.input: False}
    for op in graph.ops:
        ins = [r for r in op.ins if not isinstance(r, Lit) and r in dep]
        if ins:
            stat = op.name in REDUCTIONS or all(statistic[r] for r in ins)
            statistic.update(dict.fromkeys(op.outs, stat))
    return _View(graph, frozenset(dep), _consumers(graph), producer, statistic)


def plan(graph: Graph, merge: str = "chain") -> Plan:
    """Groups the input-dependent operations of ``graph`` into nodes (see the module docstring).

    Args:
      graph: from ``graph.trace``.
      merge: what a linear node takes in after its own operation: ``"chain"`` the whole affine
        chain of constants that follows (bias, BatchNorm, a scaling: zennit's canonizers), or
        ``"bias"`` only the bias its own module adds (LXT applies ε to each layer's ``Wx + b``).
    """
    if merge not in MERGES:
        raise ValueError(f"unknown merge {merge!r}; choose one of {list(MERGES)}")
    g = _view(graph)
    if graph.output not in g.dep:
        raise ValueError("the model's output does not depend on its input")
    patterns, absorbed, unsupported = _patterns(g)
    nodes, source = list(patterns.values()), {}
    for i, op in enumerate(graph.ops):
        dep_ins = g.dep_ins(op)
        if i in absorbed or not dep_ins or op.outs[0] in unsupported:
            continue
        sources = {source.get(r, r) for r in dep_ins}
        node = None
        if op.name in LINEAR and len(dep_ins) == 1 and _linear_ok(op):
            dims = _param_dims(graph, op, op.ins.index(dep_ins[0]))
            steps, ops = _chain(g, i, dims if merge == "chain" else "bias")
            node = Node(LINEAR[op.name], "", op, dep_ins, 0, (), steps=steps)
        elif (op.name == "dot_general" and len(dep_ins) == 2) or (
            op.name == "mul" and len(sources) == 2
        ):
            node, ops = Node("product", "", op, dep_ins, 0, (), ops=(op,)), ()
        elif op.name in SUMS or (op.name in ("add", "sub") and len(sources) == 2):
            steps, ops = _chain(g, i, None)
            node = Node("sum", "", op, dep_ins, 0, (), ops=(op, *(graph.ops[j] for j in ops)))
        elif op.name in STRUCTURAL:
            node, ops = Node("structural", "", op, dep_ins, 0, (), ops=(op,)), ()
        elif op.name in ELEMENTWISE and len(sources) == 1 and _same_shape(graph, op, dep_ins):
            source[op.outs[0]] = sources.pop()
            continue
        if node is None:
            unsupported.update(dict.fromkeys(op.outs, (op, _NO_RULE)))
            continue
        absorbed.update(ops)
        members = (op.outs[0], *(graph.ops[j].outs[0] for j in ops))
        nodes.append(dataclasses.replace(node, output=members[-1], members=members))
    nodes += _regions(g, source, absorbed)
    nodes = _with_weights(g, sorted(nodes, key=lambda n: g.producer[n.output]))
    nodes = _named(nodes)
    alias = {m: n.output for n in nodes for m in n.members}
    layers = {**{n.name: n.output for n in nodes}, **_scope_outputs(graph, g.dep)}
    linear = tuple(n for n in nodes if n.is_linear)
    return Plan(graph, tuple(nodes), linear, layers, alias, unsupported)


def _consumers(graph: Graph) -> dict[int, list[int]]:
    """id -> indices of the ops that read it (the graph's output counts as one more reader)."""
    out: dict[int, list[int]] = {graph.output: [-1]}
    for j, op in enumerate(graph.ops):
        for r in dict.fromkeys(r for r in op.ins if not isinstance(r, Lit)):
            out.setdefault(r, []).append(j)
    return out


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


# --------------------------------------------------------------------------- chains and patterns


def _chain(g: _View, i: int, mode):
    """The affine steps that follow op ``i`` (each the only reader of the value before it).

    ``mode``: the output dims a scale may vary along to merge into a linear node's kernel;
    ``"bias"``: one add or subtract of a constant made in the op's own scope (a layer's bias);
    ``"scope"``: any constant steps made in the op's own scope (a normalization's scale and
    bias); ``None``: scaling only (a mean's division).
    """
    graph = g.graph
    steps, ops, cur = [], [], graph.ops[i].outs[0]
    scope = graph.ops[i].scope[-1:]
    while cur != graph.output and len(g.consumers.get(cur, ())) == 1:
        j = g.consumers[cur][0]
        op = graph.ops[j]
        other = [r for r in op.ins if r != cur]
        if op.name not in AFFINE or len(other) != 1 or op.ins.count(cur) != 1:
            break
        if not isinstance(other[0], Lit) and other[0] in g.dep:
            break
        if mode in ("bias", "scope") and op.scope[-1:] != scope:
            break
        step = _step(g, op, cur, other[0], mode)
        if step is None:
            break
        steps.append(step)
        ops.append(j)
        cur = op.outs[0]
        if mode == "bias":
            break
    return tuple(steps), tuple(ops)


def _step(g: _View, op, cur, ref, mode) -> Step | None:
    """The chain step of ``op`` on the value ``cur`` and constant ``ref``, or ``None`` to stop."""
    left = op.ins.index(ref) == 0
    if op.name == "div" and left:
        return None  # k / v is not affine
    if mode is None:  # a mean: scaling only
        return Step(op.name, ref, left) if op.name in ("mul", "div") else None
    if op.name in ("add", "sub"):
        return Step(op.name, ref, left)
    if mode == "bias":
        return None
    if mode == "scope":
        return Step(op.name, ref, left)
    merged = _mergeable(g, ref, g.graph.shapes[cur].shape, mode)
    if merged is None:
        return None
    ref, shape = merged
    return Step(op.name, ref, left, shape)


def _mergeable(g: _View, ref, out_shape, param_dims):
    """``(ref, shape)`` of a scale that varies only along ``param_dims``, else ``None``.

    A scale broadcast to the full output (``broadcast_in_dim``) is read from before the broadcast.
    """
    shape = _shape(g.graph, ref)
    if len(shape) == 0:
        return ref, None
    if len(shape) == len(out_shape) and all(
        shape[d] == 1 for d in range(len(shape)) if d not in param_dims
    ):
        return ref, None
    producer = g.op_of(ref)
    if producer is None or producer.name != "broadcast_in_dim":
        return None
    small = [1] * len(out_shape)
    dims = producer.params["broadcast_dimensions"]
    for size, d in zip(_shape(g.graph, producer.ins[0]), dims, strict=True):
        small[d] = size
    if any(small[d] != 1 for d in range(len(small)) if d not in param_dims):
        return None
    return producer.ins[0], tuple(small)


def _between(g: _View, tops, root: int) -> set[int] | None:
    """The values on input-dependent paths from ``root`` to ``tops`` (``root`` excluded), or
    ``None`` if a path into ``tops`` bypasses ``root``."""
    seen, todo = set(), [t for t in tops if t != root]
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        if v < root or v not in g.producer:  # made before root: it does not go through root
            return None
        seen.add(v)
        todo += [r for r in g.dep_ins(g.graph.ops[g.producer[v]]) if r != root]
    return seen


def _dominator(g: _View, tops) -> tuple[int, set[int]] | None:
    """The latest value every input-dependent path into ``tops`` goes through, and the values
    between it and ``tops``."""
    heap, tried = [-t for t in tops], set()
    while heap:
        r = -heapq.heappop(heap)
        if r in tried:
            continue
        tried.add(r)
        inside = _between(g, tops, r)
        if inside is not None:
            return r, inside
        if r in g.producer:
            for q in g.dep_ins(g.graph.ops[g.producer[r]]):
                heapq.heappush(heap, -q)
    return None


def _closed(g: _View, inside: set[int], output: int) -> bool:
    """Whether every value inside a node is read only inside it."""
    members = inside | {output}
    for v in inside - {output}:
        for j in g.consumers.get(v, ()):
            if j == -1 or not set(g.graph.ops[j].outs) & members:
                return False
    return True


def _subgraph(g: _View, output: int, stop) -> tuple[Op, ...]:
    """The ops computing ``output`` from the values in ``stop``, in forward order."""
    seen, todo = set(), [output]
    while todo:
        v = todo.pop()
        if v in seen or v in stop or v not in g.producer:
            continue
        seen.add(v)
        todo += g.dep_ins(g.graph.ops[g.producer[v]])
    return tuple(g.graph.ops[j] for j in sorted({g.producer[v] for v in seen}))


def _patterns(g: _View):
    """Softmax and normalization nodes (found before the generic grouping, which would split
    them), the op indices they absorb, and the divisions by a statistic that fit neither."""
    graph = g.graph
    nodes, absorbed, refused = {}, set(), {}
    for j, op in enumerate(graph.ops):
        ins = g.dep_ins(op)
        if j in absorbed or op.name not in ("mul", "div") or len(ins) != 2:
            continue
        stats = [r for r in op.ins if r in ins and g.statistic[r]]
        if len(stats) != 1 or (op.name == "div" and op.ins[1] != stats[0]):
            continue
        node = _softmax(g, j) or _normalize(g, j, stats[0])
        if node is None:
            refused.update(
                dict.fromkeys(
                    op.outs,
                    (op, "a value divided or multiplied by a statistic of itself that is neither a "
                     "softmax nor a normalization (docs/lrp_rules.md)"),
                )
            )  # fmt: skip
            continue
        node_ops = {g.producer[m] for m in node.members}
        absorbed |= node_ops
        nodes[max(node_ops)] = node
    return nodes, absorbed, refused


def _softmax(g: _View, j: int) -> Node | None:
    """``exp(x - c) / broadcast(Σ exp(x - c))`` at op ``j``, ``c`` a shift computed from ``x`` by
    reductions (the max), reshapes or transposes on the way allowed."""
    graph = g.graph
    op = graph.ops[j]
    num, den = op.ins
    exp = g.op_of(num)
    if exp is None or exp.name != "exp":
        return None
    total = g.op_of(den)
    while total is not None and total.name in SUM_TO_DIVISION:
        total = g.op_of(total.ins[0])
    if total is None or total.name != "reduce_sum":
        return None
    summed = g.op_of(total.ins[0])  # the numerator, or the same exp written twice
    if total.ins[0] != num and (summed is None or summed.name != "exp" or summed.ins != exp.ins):
        return None
    x = exp.ins[0]
    shift = g.op_of(x)
    if shift is not None and shift.name == "sub" and len(g.dep_ins(shift)) == 2:
        if not g.statistic[shift.ins[1]]:
            return None
        found = _dominator(g, g.dep_ins(shift))
        if found is None or any(o.name not in SHIFT for o in _subgraph(g, x, {found[0]})):
            return None
        x = found[0]
    out = op.outs[0]
    inside = _between(g, [out], x)
    if inside is None or not _closed(g, inside, out):
        return None
    return Node("softmax", "", op, (x,), out, tuple(sorted(inside)), ops=_subgraph(g, out, {x}))


def _normalize(g: _View, j: int, stat: int) -> Node | None:
    """``v ⊙ stat`` (or ``v / stat``) at op ``j`` where ``stat`` is computed from ``v``'s own
    input through reductions and ``v`` is that input centred or not; with the constant scale and
    bias its module applies after it."""
    graph = g.graph
    op = graph.ops[j]
    (v,) = [r for r in g.dep_ins(op) if r != stat]
    found = _dominator(g, [v, stat])
    if found is None:
        return None
    root, inside = found
    centring = _subgraph(g, v, {root})
    if any(c.name not in CENTRING for c in centring):
        return None
    if any(c.name in ("mul", "div") and not _is_affine(g, c) for c in centring):
        return None
    _, chain = _chain(g, j, "scope")
    out = graph.ops[chain[-1]].outs[0] if chain else op.outs[0]
    inside = inside | {op.outs[0]} | {graph.ops[k].outs[0] for k in chain}
    if not _closed(g, inside, out):
        return None
    ops = _subgraph(g, out, {root, stat})
    return Node(
        "normalize", "", op, (root,), out, tuple(sorted(inside)), ops=ops, frozen=frozenset({stat})
    )


def _regions(g: _View, source: Mapping[int, int], absorbed) -> list[Node]:
    """One node for each element-wise value read outside its region (the element-wise operations
    of one source): ``affine`` if it only scales or shifts by constants, else ``elementwise``."""
    graph = g.graph
    nodes = []
    for v, src in source.items():
        readers = g.consumers.get(v, ())
        if all(
            j != -1 and j not in absorbed and source.get(graph.ops[j].outs[0]) == src
            for j in readers
        ):
            continue
        ops = _subgraph(g, v, {src})
        affine = all(_is_affine(g, op) for op in ops)
        members = tuple(o for op in ops for o in op.outs)
        kind = "affine" if affine else "elementwise"
        nodes.append(Node(kind, "", graph.ops[g.producer[v]], (src,), v, members, ops=ops))
    return nodes


def _is_affine(g: _View, op: Op) -> bool:
    ins = [r for r in op.ins if not isinstance(r, Lit) and r in g.dep]
    if op.name in IDENTITY:
        return True
    if op.name not in AFFINE or len(ins) != 1:
        return False
    return not (op.name == "div" and op.ins[0] != ins[0])


def _with_weights(g: _View, nodes: list[Node]) -> list[Node]:
    """Marks each product's operand that CP-LRP holds constant: the one computed by a softmax or an
    element-wise non-linearity (through reshapes, casts and scalings), when exactly one is."""
    gate = {n.output for n in nodes if n.kind in ("softmax", "elementwise")}
    for n in nodes:  # forward order: carried through any chain of reshapes and casts
        if n.kind in ("structural", "affine") and len(n.inputs) == 1 and n.inputs[0] in gate:
            gate.add(n.output)
    out = []
    for n in nodes:
        if n.kind == "product":
            gated = [r for r in n.inputs if r in gate]
            n = dataclasses.replace(n, weights=gated[0] if len(gated) == 1 else None)
        out.append(n)
    return out


def _named(nodes: list[Node]) -> list[Node]:
    """Names every node: a linear node by its innermost scope, or by kind and position
    (``dense_2``); any other by scope and kind (``block_0/attn/softmax``); a name used again (a
    module called twice) gets ``:1``, ``:2``, ..."""
    out, seen, k = [], {}, 0
    for node in nodes:
        scope = node.op.scope[-1] if node.op.scope else ""
        if node.is_linear:
            name = scope or f"{node.kind}_{k}"
            k += 1
        else:
            name = f"{scope}/{node.kind}" if scope else node.kind
        seen[name] = seen.get(name, -1) + 1
        out.append(dataclasses.replace(node, name=f"{name}:{seen[name]}" if seen[name] else name))
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
        Other nodes: the node's ops at the input-dependent values ``x`` (a tuple, one per
        ``node.inputs``), its frozen values (a statistic) as evaluated."""
        node, env = self.node, self.env
        if node.is_linear:
            args = [value(env, r) for r in node.op.ins]
            args[node.x_pos], args[1 - node.x_pos] = x, params["kernel"]
            return run_op(node.op, args)[0] + params["bias"]
        local = dict(zip(node.inputs, x, strict=True))
        for op in node.ops:
            args = [
                local[r] if not isinstance(r, Lit) and r in local else value(env, r) for r in op.ins
            ]
            local.update(zip(op.outs, run_op(op, args), strict=True))
        return local[node.output]


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
      ValueError: relevance reached an operation without a rule (the message names it and its
        layer), or a value inside a node from outside it.
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
            elif v in p.unsupported:
                bad, reason = p.unsupported[v]
                raise ValueError(
                    f"no LRP rule for the operation {bad.name!r} in {bad.where}: {reason}"
                )
            else:
                raise ValueError(
                    f"relevance reached a value inside a node from outside it (the operation "
                    f"{op.name!r} in {op.where}); docs/lrp_rules.md"
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
