"""Explanations of model decisions — LRP, gradient methods, occlusion, class activation maps — and
their evaluation (``lenet_jax.explain.metrics``), for any JAX model. Depends on JAX and Flax only:
nothing else of the package is imported but ``lenet_jax.cpu_kernels`` (which imports only JAX).

Every method has the signature ``method(f, x, target=None, **options)``: ``f`` is the model, a function
from a batch ``x`` (NHWC float for images) to logits ``[B, K]`` — ``functools.partial(module.apply,
variables)`` for a Linen module, an ``nnx.Module`` in evaluation mode, or any JAX function closing
over its parameters — and ``target`` is ``None`` (the predicted class), an int, or an int array
``[B]``. Pixel methods return ``x.shape``; CAMs return ``[B, H, W]``. All are pure functions of
``x``: ``jax.jit`` and ``jax.vmap`` compose with them, e.g.
``jax.jit(lambda v, x: lrp(partial(model.apply, v), x))``. ``prepare(apply, x_spec, method, **options)``
does that once: an ``Explainer`` called as ``explainer(variables, x, target=None)``, compiled for
``x_spec``'s shape on its first call.

On the CPU backend every method evaluates the model with its convolutions in the forms
``lenet_jax.cpu_kernels`` chooses by shape (the same function, faster on XLA:CPU; switch:
``cpu_kernels.forms(False)`` or ``LENET_JAX_CPU_FORMS=0``); layer names and rules see the model as
written.

Bad input: called eagerly, every method raises a one-line ``ValueError`` for an empty batch, an input
holding NaN or inf, and a target outside ``[0, K)``. Under ``jax.jit`` values cannot be checked: the
map of a sample with a non-finite input or an out-of-range target is NaN (never a plausible map).
"""

import inspect

from lenet_jax.explain import metrics
from lenet_jax.explain.cams import grad_cam, layer_activations, score_cam
from lenet_jax.explain.gradients import (
    gradient_x_input,
    integrated_gradients,
    occlusion,
    saliency,
    smoothgrad,
    smoothgrad_noise,
)
from lenet_jax.explain.lrp import (
    COMPOSITES,
    ZENNIT_COMPOSITES,
    Composite,
    composite_rules,
    conservation,
    layer_names,
    lrp,
    lrp_layerwise,
    lrp_nodes,
    make_rule,
    node_rules,
    token_relevance,
)
from lenet_jax.explain.prepared import Explainer, prepare
from lenet_jax.explain.rules import RULES

# name -> method; every entry takes (f, x, target=None, **options).
METHODS = {
    "lrp": lrp,
    "saliency": saliency,
    "gradient_x_input": gradient_x_input,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "grad_cam": grad_cam,
    "score_cam": score_cam,
    "occlusion": occlusion,
}
# Methods whose output is a [B, H, W] map rather than x.shape.
CAM_METHODS = ("grad_cam", "score_cam")
# Whether a method's map is signed (evidence for and against the class, drawn red and blue) or
# non-negative (an importance, drawn in one colour).
SIGNED = {
    "lrp": True,
    "saliency": False,
    "gradient_x_input": True,
    "smoothgrad": True,
    "integrated_gradients": True,
    "grad_cam": False,
    "score_cam": False,
    "occlusion": True,
}


def method_options(name: str) -> dict:
    """The keyword options of method ``name`` and their defaults, e.g. ``{"n_samples": 50, ...}``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    params = inspect.signature(METHODS[name]).parameters.values()
    return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}


def attribute(name: str, f, x, target=None, **options):
    """Runs the method ``name`` of ``METHODS``.

    Raises:
      ValueError: unknown name (the message lists the valid ones).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](f, x, target, **options)


__all__ = [
    "CAM_METHODS",
    "COMPOSITES",
    "Composite",
    "Explainer",
    "METHODS",
    "RULES",
    "SIGNED",
    "attribute",
    "composite_rules",
    "conservation",
    "grad_cam",
    "gradient_x_input",
    "integrated_gradients",
    "layer_activations",
    "layer_names",
    "lrp",
    "lrp_layerwise",
    "lrp_nodes",
    "make_rule",
    "method_options",
    "metrics",
    "node_rules",
    "occlusion",
    "prepare",
    "saliency",
    "score_cam",
    "smoothgrad",
    "smoothgrad_noise",
    "token_relevance",
    "ZENNIT_COMPOSITES",
]
