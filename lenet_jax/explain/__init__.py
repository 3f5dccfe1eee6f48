"""Explanations of model decisions: LRP, gradient methods and class activation maps.

Every method has the signature ``method(model, params, x, target=None, **options)`` with ``x`` the
normalized NHWC batch and ``target`` ``None`` (the predicted class), an int, or an int array ``[B]``.
"""

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

__all__ = [
    "BASE_RULES",
    "COMPOSITES",
    "RULES",
    "composite_rules",
    "conservation",
    "lrp",
    "lrp_layerwise",
    "make_rule",
    "propagate",
]
