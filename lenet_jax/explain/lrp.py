"""Layer-wise Relevance Propagation as a pure function over stored activations.

``forward`` keeps every layer's input; ``propagate`` walks the layers backward and applies one rule
per layer (``lenet_jax.explain.rules``). Composites are data: for each named composite, which rule the
first parametrized layer, the other convolutions and the dense layers get; layers without parameters
follow ``BASE_RULES`` (activations pass, average pooling uses Norm, max pooling and flatten the
gradient), as in zennit's built-in composites.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from lenet_jax.data import normalized_range
from lenet_jax.explain import rules as R
from lenet_jax.explain._common import check_input, chunked_map, resolve_target
from lenet_jax.layers import Layer, forward

# composite name -> rule name for {"first": first conv/dense layer, "conv": ..., "dense": ...}.
COMPOSITES: dict[str, dict[str, str]] = {
    "epsilon": {"first": "epsilon", "conv": "epsilon", "dense": "epsilon"},
    "epsilon_plus": {"first": "zplus", "conv": "zplus", "dense": "epsilon"},
    "epsilon_plus_flat": {"first": "flat", "conv": "zplus", "dense": "epsilon"},
    "epsilon_alpha2_beta1": {"first": "alpha2_beta1", "conv": "alpha2_beta1", "dense": "epsilon"},
    "epsilon_alpha2_beta1_flat": {"first": "flat", "conv": "alpha2_beta1", "dense": "epsilon"},
    "epsilon_gamma_box": {"first": "zbox", "conv": "gamma", "dense": "epsilon"},
}
# The first layer of a composite is its first conv/dense layer; zennit's epsilon_plus_flat does the
# same, its epsilon_gamma_box looks only at convolutions (the first layer of every model here).
# A dense first layer under "conv" rules (a fully connected model) follows the "first"/"dense" keys.

BASE_RULES: dict[str, str] = {
    "activation": "pass",
    "dropout": "pass",
    "avg_pool": "norm",
    "max_pool": "gradient",
    "flatten": "gradient",
}


def make_rule(name: str, *, epsilon=1e-6, gamma=0.25, low=None, high=None, stabilizer=1e-6):
    """A rule instance from its name (one of ``lenet_jax.explain.rules.RULES``)."""
    if name not in R.RULES:
        raise ValueError(f"unknown LRP rule {name!r}; choose one of {sorted(R.RULES)}")
    if name == "epsilon":
        return R.Epsilon(epsilon)
    if name == "gamma":
        return R.Gamma(gamma, stabilizer)
    if name == "zbox":
        lo, hi = normalized_range()
        return R.ZBox(lo if low is None else low, hi if high is None else high, stabilizer)
    if name in ("pass", "gradient"):
        return R.RULES[name]()
    return R.RULES[name](stabilizer=stabilizer)


def composite_rules(
    layers: Sequence[Layer],
    composite: str | Mapping = "epsilon_plus_flat",
    **hyper,
) -> tuple:
    """One rule per layer.

    Args:
      layers: the model's layer sequence.
      composite: a name in ``COMPOSITES``, or a mapping layer name -> rule (a rule name or a rule
        instance). A mapping must name every conv/dense layer; other layers default to
        ``BASE_RULES``.
      **hyper: ``epsilon``, ``gamma``, ``low``, ``high``, ``stabilizer`` for rules made from names.

    Returns:
      A tuple of rules, aligned with ``layers``.
    """
    names = [layer.name for layer in layers]

    def as_rule(rule):
        return make_rule(rule, **hyper) if isinstance(rule, str) else rule

    if isinstance(composite, Mapping):
        unknown = sorted(set(composite) - set(names))
        if unknown:
            raise ValueError(f"composite names unknown layers {unknown}; the layers are {names}")
        missing = [
            layer.name for layer in layers if layer.has_params and layer.name not in composite
        ]
        if missing:
            raise ValueError(f"composite gives no rule for the layers {missing}")
        return tuple(
            as_rule(composite[layer.name])
            if layer.name in composite
            else as_rule(BASE_RULES[layer.kind])
            for layer in layers
        )
    if composite not in COMPOSITES:
        raise ValueError(f"unknown composite {composite!r}; choose one of {sorted(COMPOSITES)}")
    table = COMPOSITES[composite]
    first = next((i for i, layer in enumerate(layers) if layer.has_params), None)
    out = []
    for i, layer in enumerate(layers):
        if i == first:
            out.append(as_rule(table["first"]))
        elif layer.has_params:
            out.append(as_rule(table[layer.kind]))
        else:
            out.append(as_rule(BASE_RULES[layer.kind]))
    return tuple(out)


def propagate(layers: Sequence[Layer], rules: Sequence, params, inputs, relevance_out):
    """Walks the layers backward, applying ``rules[i]`` to layer ``i``.

    Args:
      layers: the layer sequence.
      rules: one rule per layer.
      params: the model's ``"params"`` collection.
      inputs: each layer's stored input (``lenet_jax.layers.forward``).
      relevance_out: relevance at the model output, ``[B, K]``.

    Returns:
      Dict: ``"input"`` -> relevance at the model input, and each layer name -> the relevance at
      that layer's output.
    """
    relevances = {}
    rel = relevance_out
    for layer, rule, x in zip(reversed(layers), reversed(rules), reversed(inputs), strict=True):
        relevances[layer.name] = rel
        rel = rule(layer, params[layer.name] if layer.has_params else None, x, rel)
    relevances["input"] = rel
    return relevances


def lrp_layerwise(
    model,
    params,
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
    """LRP relevance at every layer.

    Same arguments as ``lrp``.

    Returns:
      Dict: ``"input"`` -> ``[B, H, W, C]`` input relevance; each layer name -> relevance at that
      layer's output (e.g. ``"conv2"`` -> ``[B, 10, 10, 16]``: the relevance of each feature map);
      the last layer's entry is the seed ``one_hot(target) * logit``.
    """
    check_input(model, x)
    layers = model.layers
    black, white = normalized_range(model.dataset)
    low, high = black if low is None else low, white if high is None else high
    rules = composite_rules(
        layers, composite, epsilon=epsilon, gamma=gamma, low=low, high=high, stabilizer=stabilizer
    )
    logits, inputs = forward(layers, params, x)
    t = resolve_target(target, logits)
    seed = jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype) * logits
    return propagate(layers, rules, params, inputs, seed)


def lrp(
    model,
    params,
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

    Pure and traceable: wrap it in ``jax.jit`` (with the non-array arguments closed over) or
    ``jax.vmap`` freely.

    Args:
      model: a ``lenet_jax.models.SequentialModel`` (its ``layers`` are walked backward).
      params: the ``"params"`` collection of ``model.init``.
      x: normalized NHWC batch ``[B, H, W, C]``.
      target: ``None`` (predicted class), an int, or an int array ``[B]``.
      composite: a name in ``COMPOSITES`` or a mapping layer name -> rule.
      epsilon: ε of the epsilon rule (dense layers in every built-in composite).
      gamma: γ of the gamma rule.
      low, high: input bounds of the zB rule, scalars or ``[H, W, C]``; default the normalized
        values of a black and a white pixel of the model's dataset.
      stabilizer: the denominator stabilizer of the other rules.
      batch_size: images per chunk (``lax.map``) to bound memory; ``None`` = all at once.

    Returns:
      Relevance ``[B, H, W, C]``. The output relevance is ``one_hot(target) * logit``, so with
      ε → 0 and zero biases the relevance of each sample sums to its target logit.
    """

    kwargs = dict(
        composite=composite, epsilon=epsilon, gamma=gamma, low=low, high=high, stabilizer=stabilizer
    )
    if not batch_size:
        return lrp_layerwise(model, params, x, target, **kwargs)["input"]
    check_input(model, x)
    if target is None:  # each chunk finds its own predicted classes
        return chunked_map(
            lambda xb: lrp_layerwise(model, params, xb, None, **kwargs)["input"], x, batch_size
        )
    t = resolve_target(target, jnp.zeros((x.shape[0], model.layers[-1].features)))
    return chunked_map(
        lambda a: lrp_layerwise(model, params, a[0], a[1], **kwargs)["input"], (x, t), batch_size
    )


def conservation(relevances: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-sample relevance sums ``[B]`` at every layer of ``lrp_layerwise``'s output."""
    return {name: jnp.sum(r.reshape(r.shape[0], -1), axis=1) for name, r in relevances.items()}
