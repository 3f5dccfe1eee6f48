"""The registry of the JAX primitives the attribution engine knows, by the role each plays.

Every name here is a primitive of the installed JAX (``tests/test_graph.py`` checks them against the
primitives JAX defines, so a rename in a JAX release fails a test instead of silently matching
nothing). An operation outside the registry that relevance reaches is an error naming it.
"""

from __future__ import annotations

# Calls whose body the tracer inlines, and the parameter that holds the body.
CALLS = {
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "remat2": "jaxpr",  # jax.checkpoint / jax.remat
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
}
# Calls with a derivative rule of their own: evaluated again as calls, so gradients keep the rule.
CUSTOM_DERIVATIVES = frozenset({"custom_jvp_call", "custom_vjp_call"})
# Calls the tracer rewrites into primitives it knows (``split`` into one ``slice`` per part).
REWRITTEN = frozenset({"split"})

# Linear layers (with one input-dependent operand) and their node kind.
LINEAR = {"conv_general_dilated": "conv", "dot_general": "dense"}
# Sums over windows or axes.
SUMS = frozenset({"reduce_window_sum", "reduce_sum"})
# Reductions along axes: a value computed from the input only through one of these is a statistic.
REDUCTIONS = frozenset(
    {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin"}
)
# Operations that move, select or copy values (relevance follows their vector-Jacobian product).
STRUCTURAL = frozenset(
    {"reshape", "transpose", "squeeze", "broadcast_in_dim", "slice", "dynamic_slice", "gather",
     "pad", "concatenate", "rev", "reduce_max", "reduce_window_max", "copy", "reduce_precision"}
)  # fmt: skip
# Element-wise functions (of one input-dependent value they are activations; of two, see the engine).
ELEMENTWISE = frozenset(
    {"tanh", "logistic", "exp", "exp2", "expm1", "log", "log1p", "erf", "erfc", "max", "min",
     "clamp", "select_n", "add", "sub", "mul", "div", "neg", "abs", "sign", "integer_pow", "pow",
     "square", "sqrt", "rsqrt", "convert_element_type", "stop_gradient", "ge", "gt", "le", "lt",
     "eq", "ne", "and", "or", "not"}
)  # fmt: skip
# Element-wise operations that are affine in their one input-dependent operand.
AFFINE = frozenset({"add", "sub", "mul", "div"})
# Element-wise operations that leave a value as it is (up to sign or dtype).
IDENTITY = frozenset({"neg", "convert_element_type"})
# What a normalization may apply to its input before dividing by its statistic: the centring
# (``x - mean(x)``) and reshapes, all linear once the statistic is held.
CENTRING = frozenset(
    {"add", "sub", "mul", "div", "neg", "reduce_sum", "broadcast_in_dim", "reshape", "squeeze",
     "convert_element_type", "copy", "stop_gradient"}
)  # fmt: skip
# What may lie between a softmax's input and ``exp``'s argument: ``x - stop_gradient(max(x))``.
SHIFT = frozenset(
    {"sub", "reduce_max", "max", "stop_gradient", "broadcast_in_dim", "reshape", "transpose",
     "squeeze", "convert_element_type"}
)  # fmt: skip
# What may lie between a softmax's sum and its division.
SUM_TO_DIVISION = frozenset({"broadcast_in_dim", "reshape", "convert_element_type"})


def registered() -> frozenset[str]:
    """Every primitive name in the registry."""
    return frozenset().union(
        CALLS, REWRITTEN, LINEAR, SUMS, REDUCTIONS, STRUCTURAL, ELEMENTWISE, CENTRING, SHIFT,
        SUM_TO_DIVISION,
    )  # fmt: skip
