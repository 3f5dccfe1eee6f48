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
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from lenet_jax.explain import engine
from lenet_jax.explain import rules as R
from lenet_jax.explain.common import (
    attribution_method,
    auto_batch_size,
    check_batch,
    check_logits,
    chunked_map,
    resolve_target,
)
from lenet_jax.explain.graph import evaluate, trace


@dataclasses.dataclass(frozen=True)
class Composite:
    """A rule for each kind of node (``engine.KINDS``), and optionally another for the first layer.

    Attributes:
      conv: rule name of the convolutions (``conv_general_dilated``).
      dense: rule name of the dense layers (``dot_general``).
      first: rule name of the first layer among ``first_kinds``, or ``None``.
      first_kinds: which kinds count as "first": zennit's ``*_flat`` composites take the first
        linear layer of either kind, ``EpsilonGammaBox`` the first convolution only.
      sum: pooling, means and residual sums: ``"norm"`` (zennit) or ``"exact"`` (AttnLRP).
      affine: a value scaled or shifted by constants outside a layer (a position embedding):
        ``"pass"`` (zennit: relevance unchanged) or ``"exact"`` (AttnLRP: the constant takes its
        share).
      elementwise: element-wise non-linearities (``"pass"``: zennit's and AttnLRP's identity rule).
      softmax, normalize: ``"exact"`` (AttnLRP's softmax rule; LayerNorm and RMSNorm with their
        statistic held constant).
      product: the product of two activations: ``"uniform"`` (AttnLRP) or ``"cp"`` (CP-LRP).
      structural: reshapes, slicing, max pooling: ``"gradient"``.
      merge: ``"chain"`` merges the affine chain after a linear layer into it (BatchNorm, as
        zennit's canonizer), ``"bias"`` only the layer's own bias (LXT's ε on ``Wx + b``).
    """

    conv: str
    dense: str
    first: str | None = None
    first_kinds: tuple[str, ...] = ("conv", "dense")
    sum: str = "norm"
    affine: str = "pass"
    elementwise: str = "pass"
    softmax: str = "exact"
    normalize: str = "exact"
    product: str = "uniform"
    structural: str = "gradient"
    merge: str = "chain"


# zennit 0.5.1's built-in LRP composites, name for name (``zennit.composites``).
ZENNIT_COMPOSITES = (
    "epsilon",
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "epsilon_gamma_box",
)
# AttnLRP (Achtibat et al., 2024) as LXT 2.1 applies it, and CP-LRP (Ali et al., 2022).
_ATTN = dict(sum="exact", affine="exact", merge="bias")
COMPOSITES: dict[str, Composite] = {
    "epsilon": Composite("epsilon", "epsilon"),
    "epsilon_plus": Composite("zplus", "epsilon"),
    "epsilon_plus_flat": Composite("zplus", "epsilon", "flat"),
    "epsilon_alpha2_beta1": Composite("alpha2_beta1", "epsilon"),
    "epsilon_alpha2_beta1_flat": Composite("alpha2_beta1", "epsilon", "flat"),
    "epsilon_gamma_box": Composite("gamma", "epsilon", "zbox", ("conv",)),
    "attn_lrp": Composite("epsilon", "epsilon", **_ATTN),
    "cp_lrp": Composite("epsilon", "epsilon", product="cp", **_ATTN),
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
    if name in ("pass", "gradient", "exact", "uniform", "cp"):
        return R.RULES[name]()
    return R.RULES[name](stabilizer=stabilizer)


def _table(composite) -> Composite:
    if isinstance(composite, Composite):
        return composite
    if isinstance(composite, Mapping):
        return COMPOSITES["epsilon"]
    if not isinstance(composite, str) or composite not in COMPOSITES:
        raise ValueError(f"unknown composite {composite!r}; choose one of {sorted(COMPOSITES)}")
    return COMPOSITES[composite]


def _as_rule(rule, hyper):
    """A rule instance: ``rule`` itself, or ``make_rule(rule, **hyper)`` for a name."""
    return make_rule(rule, **hyper) if isinstance(rule, str) else rule


def composite_rules(plan: engine.Plan, composite="epsilon_plus_flat", **hyper):
    """The rule of every linear layer of ``plan``, by layer name.

    Args:
      plan: from ``engine.plan``.
      composite: a name in ``COMPOSITES``, a ``Composite``, or a mapping layer name -> rule (a
        rule name or a rule instance) that names every linear layer (``layer_names`` lists them).
      **hyper: ``epsilon``, ``gamma``, ``low``, ``high``, ``stabilizer`` for rules made from names.

    Returns:
      Dict layer name -> rule, in forward order.
    """
    names = [node.name for node in plan.linear]

    as_rule = functools.partial(_as_rule, hyper=hyper)
    if isinstance(composite, Mapping):
        unknown = sorted(set(composite) - set(names))
        if unknown:
            raise ValueError(f"composite names unknown layers {unknown}; the layers are {names}")
        missing = [name for name in names if name not in composite]
        if missing:
            raise ValueError(f"composite gives no rule for the layers {missing}")
        return {name: as_rule(composite[name]) for name in names}
    table = _table(composite)
    first = next((n.name for n in plan.linear if n.kind in table.first_kinds), None)
    return {
        n.name: as_rule(table.first if table.first and n.name == first else getattr(table, n.kind))
        for n in plan.linear
    }


def node_rules(plan: engine.Plan, composite="epsilon_plus_flat", rules=None, **hyper) -> dict:
    """The rule of every node of ``plan``, by node name: the composite's, then ``rules``.

    Args:
      plan: from ``engine.plan``.
      composite: as for ``composite_rules``; a mapping of layer names takes the ``"epsilon"``
        composite's rules for the other kinds.
      rules: overrides, a mapping from a node kind (``engine.KINDS``: ``"softmax"``, ``"sum"``,
        ...) or a node name (``lrp_nodes`` lists them) to a rule name or instance; a name wins
        over a kind.
      **hyper: as for ``composite_rules``.

    Raises:
      ValueError: an override names neither a kind nor a node.
    """
    table = _table(composite)
    linear = composite_rules(plan, composite, **hyper)
    rules = dict(rules or {})
    names = {n.name for n in plan.nodes}
    unknown = sorted(k for k in rules if k not in names and k not in engine.KINDS)
    if unknown:
        raise ValueError(
            f"rules= names {unknown}, neither a node kind {list(engine.KINDS)} nor a node of this "
            "model (explain.lrp_nodes lists them)"
        )

    out = {}
    for n in plan.nodes:
        default = linear[n.name] if n.is_linear else getattr(table, n.kind)
        out[n.name] = _as_rule(rules.get(n.name, rules.get(n.kind, default)), hyper)
    return out


def layer_names(f: Callable, x) -> list[str]:
    """The names of ``f``'s linear layers in forward order (what a composite mapping names).

    A Linen module's layers are named by module path (``"conv2"``, ``"block1/conv_a"``), an NNX
    module's by attribute path, an unnamed layer of a plain function by kind and position
    (``"dense_0"``); ``jax.named_scope("fc1")`` around a plain function's layer names it.
    """
    return [node.name for node in engine.plan(trace(f, x)).linear]


def lrp_nodes(f: Callable, x, composite="epsilon_plus_flat") -> dict[str, str]:
    """Every node LRP walks in ``f``, name -> kind, in forward order: the names and kinds
    ``rules=`` can override (``{"block_0/attn/softmax": "softmax", "fc1": "dense", ...}``)."""
    p = engine.plan(trace(f, x), _table(composite).merge)
    return {n.name: n.kind for n in p.nodes}


def token_relevance(relevance):
    """Relevance of each token ``[B, T]``: an embedding input's relevance ``[B, T, D]`` summed over
    the hidden dimension (explain a text model from its embeddings, ``f(emb)``)."""
    return jnp.sum(relevance, axis=-1)


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
    rules: Mapping | None = None,
):
    """LRP relevance at the input and at the output of every layer.

    Same arguments as ``lrp``.

    Returns:
      Dict: ``"input"`` -> ``x.shape`` input relevance; each layer name (every module path of a
      Linen or NNX model, at every nesting level, and every node ``lrp_nodes`` names) -> the
      relevance at that layer's output, e.g. ``"conv2"`` -> ``[B, 10, 10, 16]`` for LeNet-5: the
      relevance of each feature map; ``"block_0/attn/product:1"`` -> ``[B, heads, T, head_dim]``
      for the ViT: attention · values per head (the product's batch axes come first). A
      convolution followed by BatchNorm is one layer for LRP (the BatchNorm merged into it, as
      zennit's canonizer does), so both names carry the relevance after the BatchNorm.
      The output layer's entry is the seed ``one_hot(target) * logit``.
    """
    check_batch(x)
    graph = trace(f, x)
    plan = engine.plan(graph, _table(composite).merge)
    hyper = dict(epsilon=epsilon, gamma=gamma, low=low, high=high, stabilizer=stabilizer)
    by_name = node_rules(plan, composite, rules, **hyper)
    env = evaluate(graph, x)
    logits = env[graph.output]
    check_logits(logits, x)
    t = resolve_target(target, logits)
    seed = jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype) * logits
    rel = engine.walk(plan, env, seed, lambda node: by_name[node.name])
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
    rules: Mapping | None = None,
    batch_size: int | None = None,
):
    """Layer-wise Relevance Propagation (Bach et al., 2015) with zennit's rules and composites, and
    AttnLRP (Achtibat et al., 2024) for transformers.

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
        convolutions; ``attn_lrp`` is LXT's AttnLRP: ε on every linear layer's own output, the
        uniform rule on products of activations, the softmax rule, LayerNorm/RMSNorm with their
        statistic held, the exact split on sums; ``cp_lrp`` holds the attention weights and gates
        constant), a ``Composite``, or a mapping layer name -> rule naming every linear layer.
      epsilon: ε of the epsilon rule.
      gamma: γ of the gamma rule.
      low, high: bounds of the input for the zᴮ rule (``epsilon_gamma_box``), scalars or arrays
        broadcastable to one input, e.g. the normalized black and white pixel; required by zᴮ.
      stabilizer: the denominator stabilizer of the other rules (and of Norm).
      rules: overrides of the composite, node kind or node name -> rule (``node_rules``), e.g.
        ``{"product": "cp"}`` or ``{"block_0/attn/softmax": "gradient"}``.
      batch_size: images per chunk (``lax.map``) to bound memory; ``None``: chunks that keep the
        walk within ``common.MEMORY_BUDGET`` (the whole batch when it fits).

    Returns:
      Relevance of ``x.shape``. The output relevance is ``one_hot(target) * logit``, so with
      ε → 0 and zero biases the relevance of each sample sums to its target logit.

    Under ``jax.jit`` a target outside ``[0, K)`` cannot be checked, and that sample's map is NaN
    (``common.attribution_method``), as is the map of an input holding NaN or inf.
    """
    kwargs = dict(
        composite=composite,
        epsilon=epsilon,
        gamma=gamma,
        low=low,
        high=high,
        stabilizer=stabilizer,
        rules=rules,
    )
    check_batch(x)
    # the walk keeps every activation and evaluates each rule's few modified passes
    batch_size = auto_batch_size(f, x, 4, batch_size)
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
