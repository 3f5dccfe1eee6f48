"""Explanations of model decisions: LRP, gradient methods, occlusion and class activation maps.

Every method has the signature ``method(model, params, x, target=None, **options)`` with ``x`` the
normalized NHWC batch ``[B, H, W, C]`` and ``target`` ``None`` (the predicted class), an int, or an
int array ``[B]``. Pixel methods return ``x.shape``; CAMs return ``[B, H, W]``. All are pure
functions: ``jax.jit`` them with the non-array options closed over.
"""

import inspect

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
    BASE_RULES,
    COMPOSITES,
    composite_rules,
    conservation,
    lrp,
    lrp_layerwise,
    make_rule,
    propagate,
)
from lenet_jax.explain.rules import RULES

# name -> method; every entry takes (model, params, x, target=None, **options).
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


def method_options(name: str) -> dict:
    """The keyword options of method ``name`` and their defaults, e.g. ``{"n_samples": 50, ...}``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    params = inspect.signature(METHODS[name]).parameters.values()
    return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}


def attribute(name: str, model, params, x, target=None, **options):
    """Runs the method ``name`` of ``METHODS``.

    Raises:
      ValueError: unknown name (the message lists the valid ones).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](model, params, x, target, **options)


__all__ = [
    "BASE_RULES",
    "CAM_METHODS",
    "COMPOSITES",
    "METHODS",
    "RULES",
    "attribute",
    "composite_rules",
    "conservation",
    "grad_cam",
    "gradient_x_input",
    "integrated_gradients",
    "layer_activations",
    "lrp",
    "lrp_layerwise",
    "make_rule",
    "method_options",
    "occlusion",
    "propagate",
    "saliency",
    "score_cam",
    "smoothgrad",
    "smoothgrad_noise",
]
