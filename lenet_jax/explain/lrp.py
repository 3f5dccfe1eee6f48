"""Layer-wise Relevance Propagation of any JAX model, with zennit's rules and composites.

``lrp(f, x)`` traces ``f`` to a graph of primitives (``graph.trace``), groups it into layers
(``engine.plan``: a convolution or matmul with its bias and BatchNorm merged, pooling, sums,
activations, reshapes), evaluates it once and walks it backward with one rule per layer
(``engine.walk``, rules in ``lenet_jax.explain.rules``). Composites are data: which rule the
convolutions, the dense layers and the first layer get; layers without parameters follow zennit's
``layer_map_base`` (activations pass, average pooling and sums use Norm, max pooling and reshapes the
gradient).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from lenet_jax.explain import engine
from lenet_jax.explain import rules as R
from lenet_jax.explain.common import attribution_method, check_batch, chunked_map, resolve_target
from lenet_jax.explain.graph import evaluate, trace


@dataclasses.dataclass(frozen=True)
class Composite:
    """A rule per kind of linear layer, and optionally another for the first one.

    Attributes:
      conv: rule name of the convolutions (``conv_general_dilated``).
      dense: rule name of the dense layers (``dot_general``).
      first: rule name of the first layer among ``first_kinds``, or ``None``.
      first_kinds: which kinds count as "first": zennit's ``*_flat`` composites take the first
        linear layer of either kind, ``EpsilonGammaBox`` the first convolution only.
    """

    conv: str
    dense: str
    first: str | None = None
    first_kinds: tuple[str, ...] = ("conv", "dense")


# zennit 0.5.1's built-in LRP composites, name for name (``zennit.composites``).
COMPOSITES: dict[str, Composite] = {
    "epsilon": Composite("epsilon", "epsilon"),
    "epsilon_plus": Composite("zplus", "epsilon"),
    "epsilon_plus_flat": Composite("zplus", "epsilon", "flat"),
    "epsilon_alpha2_beta1": Composite("alpha2_beta1", "epsilon"),
    "epsilon_alpha2_beta1_flat": Composite("alpha2_beta1", "epsilon", "flat"),
    "epsilon_gamma_box": Composite("gamma", "epsilon", "zbox", ("conv",)),
}


def make_rule(name: str, *, epsilon=1e-6, gamma=0.25, low=None, high=None, stabilizer=1e-6):
    """A rule instance from its name (one of ``lenet_jax.explain.rules.RULES``).

    Raises:
      ValueError: an unknown name, or ``"zbox"`` without its bounds ``low`` and ``high``.
    """
    if name not in R.RULES:
        raise ValueError(f"unknown LRP rule {name!r}; choose one of {sorted(R.RULES)}")
    if name == "epsilon":
        return R.Epsilon(epsilon)
    if name == "gamma":
        return R.Gamma(gamma, stabilizer)
    if name == "zbox":
        if low is None or high is None:
            raise ValueError("the zB rule needs the input bounds: pass low= and high=")
        return R.ZBox(low, high, stabilizer)
    if name in ("pass", "gradient"):
        return R.RULES[name]()
    return R.RULES[name](stabilizer=stabilizer)


def composite_rules(plan: engine.Plan, composite: str | Mapping = "epsilon_plus_flat", **hyper):
    """The rule of every linear layer of ``plan``, by layer name.

    Args:
      plan: from ``engine.plan``.
      composite: a name in ``COMPOSITES``, or a mapping layer name -> rule (a rule name or a rule
        instance) that names every linear layer (``layer_names`` lists them).
      **hyper: ``epsilon``, ``gamma``, ``low``, ``high``, ``stabilizer`` for rules made from names.

    Returns:
      Dict layer name -> rule, in forward order.
    """
    names = [node.name for node in plan.linear]

    def as_rule(rule):
        return make_rule(rule, **hyper) if isinstance(rule, str) else rule

    if isinstance(composite, Mapping):
        unknown = sorted(set(composite) - set(names))
        if unknown:
            raise ValueError(f"composite names unknown layers {unknown}; the layers are {names}")
        missing = [name for name in names if name not in composite]
        if missing:
            raise ValueError(f"composite gives no rule for the layers {missing}")
        return {name: as_rule(composite[name]) for name in names}
    if composite not in COMPOSITES:
        raise ValueError(f"unknown composite {composite!r}; choose one of {sorted(COMPOSITES)}")
    table = COMPOSITES[composite]
    first = next((n.name for n in plan.linear if n.kind in table.first_kinds), None)
    return {
        n.name: as_rule(table.first if table.first and n.name == first else getattr(table, n.kind))
        for n in plan.linear
    }


def _rule_of(linear_rules: Mapping, stabilizer: float) -> Callable:
    base = {"norm": R.Norm(stabilizer), "gradient": R.Gradient()}
    return lambda node: linear_rules[node.name] if node.is_linear else base[node.kind]


def layer_names(f: Callable, x) -> list[str]:
    """The names of ``f``'s linear layers in forward order (what a composite mapping names).

    A Linen module's layers are named by module path (``"conv2"``, ``"block1/conv_a"``), an NNX
    module's by attribute path, an unnamed layer of a plain function by kind and position
    (``"dense_0"``); ``jax.named_scope("fc1")`` around a plain function's layer names it.
    """
    return [node.name for node in engine.plan(trace(f, x)).linear]


@attribution_method
def lrp_layerwise(
    f: Callable,
    x,
    target=None,
    *,
    composite: str | Mapping = "epsilon_plus_flat",
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    low=None,
    high=None,
    stabilizer: float = 1e-6,
):
    """LRP relevance at the input and at the output of every layer.

    Same arguments as ``lrp``.

    Returns:
      Dict: ``"input"`` -> ``x.shape`` input relevance; each layer name (every module path of a
      Linen or NNX model, at every nesting level, and every linear layer) -> the relevance at that
      layer's output, e.g. ``"conv2"`` -> ``[B, 10, 10, 16]`` for LeNet-5: the relevance of each
      feature map. A convolution followed by BatchNorm is one layer for LRP (the BatchNorm merged
      into it, as zennit's canonizer does), so both names carry the relevance after the BatchNorm.
      The output layer's entry is the seed ``one_hot(target) * logit``.
    """
    check_batch(x)
    graph = trace(f, x)
    plan = engine.plan(graph)
    rules = composite_rules(
        plan, composite, epsilon=epsilon, gamma=gamma, low=low, high=high, stabilizer=stabilizer
    )
    env = evaluate(graph, x)
    logits = env[graph.output]
    t = resolve_target(target, logits)
    seed = jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype) * logits
    rel = engine.walk(plan, env, seed, _rule_of(rules, stabilizer))
    out = {name: engine.relevance_at(plan, rel, i) for name, i in plan.layers.items()}
    out["input"] = engine.relevance_at(plan, rel, graph.input)
    return out


@attribution_method
def lrp(
    f: Callable,
    x,
    target=None,
    *,
    composite: str | Mapping = "epsilon_plus_flat",
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    low=None,
    high=None,
    stabilizer: float = 1e-6,
    batch_size: int | None = None,
):
    """Layer-wise Relevance Propagation (Bach et al., 2015) with zennit's rules and composites.

    ``f`` is traced to its primitive operations, which are grouped into layers and walked backward
    with one rule per layer (the operation -> rule table: ``lenet_jax.explain.engine``,
    ``docs/lrp_rules.md``). Whatever in ``f`` does not depend on ``x`` is a parameter. An
    operation the walk has no rule for is a ``ValueError`` naming it and its layer, never a
    silently wrong map. Pure and traceable: ``jax.jit`` and ``jax.vmap`` compose with it, e.g.
    ``jax.jit(lambda v, x: lrp(partial(model.apply, v), x))``.

    Args:
      f: the model, ``x [B, ...] -> logits [B, K]``: ``functools.partial(module.apply,
        variables)`` for a Linen module (evaluation mode; ``variables`` may hold
        ``batch_stats``), an ``nnx.Module`` in evaluation mode, or a JAX function.
      x: input batch, e.g. NHWC ``[B, H, W, C]``.
      target: ``None`` (the predicted class), an int, or an int array ``[B]``.
      composite: a name in ``COMPOSITES`` (zennit's: ``epsilon_plus_flat`` puts Flat on the first
        linear layer of either kind, z⁺ on convolutions and ε on dense layers;
        ``epsilon_gamma_box`` puts zᴮ on the first *convolution* only, γ on the other
        convolutions), or a mapping layer name -> rule naming every linear layer.
      epsilon: ε of the epsilon rule.
      gamma: γ of the gamma rule.
      low, high: bounds of the input for the zᴮ rule (``epsilon_gamma_box``), scalars or arrays
        broadcastable to one input, e.g. the normalized black and white pixel; required by zᴮ.
      stabilizer: the denominator stabilizer of the other rules (and of Norm).
      batch_size: images per chunk (``lax.map``) to bound memory; ``None`` = all at once.

    Returns:
      Relevance of ``x.shape``. The output relevance is ``one_hot(target) * logit``, so with
      ε → 0 and zero biases the relevance of each sample sums to its target logit.

    Under ``jax.jit`` a target outside ``[0, K)`` cannot be checked, and that sample's map is NaN
    (``common.attribution_method``), as is the map of an input holding NaN or inf.
    """
    kwargs = dict(
        composite=composite, epsilon=epsilon, gamma=gamma, low=low, high=high, stabilizer=stabilizer
    )
    check_batch(x)
    if not batch_size or batch_size >= x.shape[0]:
        return lrp_layerwise(f, x, target, **kwargs)["input"]
    if target is None:  # each chunk finds its own predicted classes
        return chunked_map(lambda xb: lrp_layerwise(f, xb, None, **kwargs)["input"], x, batch_size)
    t = resolve_target(target, jax.eval_shape(f, x))
    return chunked_map(
        lambda a: lrp_layerwise(f, a[0], a[1], **kwargs)["input"], (x, t), batch_size
    )


def conservation(relevances: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-sample relevance sums ``[B]`` at every entry of ``lrp_layerwise``'s output."""
    return {name: jnp.sum(r.reshape(r.shape[0], -1), axis=1) for name, r in relevances.items()}
