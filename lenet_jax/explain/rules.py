"""LRP rules: small pure functions ``rule(layer, params, x, relevance_out) -> relevance_in``.

A rule acts on a layer given as ``layer.apply(params, x)`` (``lenet_jax.explain.engine.Layer``): for a
linear layer ``params`` is its merged ``{"kernel", "bias"}``, which a rule may modify (``W⁺``, ``1``,
``W²``) before calling ``apply``.

Each rule follows zennit's definition (``zennit.rules``): modify the inputs and the parameters,
evaluate the layer, divide the output relevance by the stabilized output, ``s = R / stabilize(z)``,
take the layer's vector-Jacobian product with ``s`` (``jax.vjp``), and multiply by the modified input.
Here ``W+``/``W-`` and ``x+``/``x-`` are the positive/negative parts of weights and inputs, and
``(W, b)`` a layer's kernel and bias.

Rules are frozen dataclasses; their fields are the rule's hyperparameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


def stabilize(z, epsilon: float):
    """``z + epsilon * sign(z)`` with ``sign(0) = +1`` (zennit's stabilizer)."""
    return z + jnp.where(z >= 0, epsilon, -epsilon).astype(z.dtype)


def _vjp(layer, params, x):
    """``(z, back)``: the layer output at ``x`` and ``s -> (dz/dx)^T s``."""
    z, pullback = jax.vjp(lambda x_: layer.apply(params, x_), x)
    return z, lambda s: pullback(s)[0]


def _map(params, fn_kernel, fn_bias):
    return {"kernel": fn_kernel(params["kernel"]), "bias": fn_bias(params["bias"])}


def _pos(a):
    return jnp.maximum(a, 0)


def _neg(a):
    return jnp.minimum(a, 0)


def _zero(a):
    return jnp.zeros_like(a)


@dataclasses.dataclass(frozen=True)
class Epsilon:
    """LRP-ε: ``R_in = x ⊙ Wᵀ(R / stab(Wx + b))``; ``epsilon = 0`` gives LRP-0."""

    epsilon: float = 1e-6

    def __call__(self, layer, params, x, relevance):
        z, back = _vjp(layer, params, x)
        return x * back(relevance / stabilize(z, self.epsilon))


@dataclasses.dataclass(frozen=True)
class ZPlus:
    """LRP-z⁺ (zennit's form, negative inputs allowed): contributions ``W⁺x⁺ + W⁻x⁻``, bias ``b⁺``."""

    stabilizer: float = 1e-6

    def __call__(self, layer, params, x, relevance):
        xp, xn = _pos(x), _neg(x)
        z1, back1 = _vjp(layer, _map(params, _pos, _pos), xp)
        z2, back2 = _vjp(layer, _map(params, _neg, _zero), xn)
        s = relevance / stabilize(z1 + z2, self.stabilizer)
        return xp * back1(s) + xn * back2(s)


@dataclasses.dataclass(frozen=True)
class AlphaBeta:
    """LRP-αβ: ``α·R⁺ − β·R⁻`` with positive ``W⁺x⁺ + W⁻x⁻ + b⁺`` and negative
    ``W⁻x⁺ + W⁺x⁻ + b⁻`` contributions normalized separately; requires ``α − β = 1``, both ≥ 0."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise ValueError(
                f"AlphaBeta needs alpha, beta >= 0 and alpha - beta = 1, got {self.alpha}, {self.beta}"
            )

    def __call__(self, layer, params, x, relevance):
        xp, xn = _pos(x), _neg(x)
        zpp, bpp = _vjp(layer, _map(params, _pos, _pos), xp)
        znn, bnn = _vjp(layer, _map(params, _neg, _zero), xn)
        zpn, bpn = _vjp(layer, _map(params, _neg, _neg), xp)
        znp, bnp = _vjp(layer, _map(params, _pos, _zero), xn)
        s_pos = relevance / stabilize(zpp + znn, self.stabilizer)
        s_neg = relevance / stabilize(zpn + znp, self.stabilizer)
        positive = xp * bpp(s_pos) + xn * bnn(s_pos)
        negative = xp * bpn(s_neg) + xn * bnp(s_neg)
        return self.alpha * positive - self.beta * negative


@dataclasses.dataclass(frozen=True)
class Gamma:
    """Generalized LRP-γ: weights ``W + γW⁺`` (or ``W + γW⁻``), chosen per output by the sign of the
    unmodified output ``Wx + b``; positive outputs spread over ``(W+γW⁺)x⁺ + (W+γW⁻)x⁻``, negative
    ones over ``(W+γW⁻)x⁺ + (W+γW⁺)x⁻``."""

    gamma: float = 0.25
    stabilizer: float = 1e-6

    def __call__(self, layer, params, x, relevance):
        g = self.gamma
        xp, xn = _pos(x), _neg(x)
        up = _map(params, lambda w: w + g * _pos(w), lambda b: b + g * _pos(b))
        dn = _map(params, lambda w: w + g * _neg(w), lambda b: b + g * _neg(b))
        up_nb, dn_nb = {**up, "bias": _zero(params["bias"])}, {**dn, "bias": _zero(params["bias"])}
        z = layer.apply(params, x)
        z1, b1 = _vjp(layer, up, xp)
        z2, b2 = _vjp(layer, dn_nb, xn)
        z3, b3 = _vjp(layer, dn, xp)
        z4, b4 = _vjp(layer, up_nb, xn)
        s_pos = (z > 0).astype(x.dtype) * relevance / stabilize(z1 + z2, self.stabilizer)
        s_neg = (z < 0).astype(x.dtype) * relevance / stabilize(z3 + z4, self.stabilizer)
        return xp * b1(s_pos) + xn * b2(s_pos) + xp * b3(s_neg) + xn * b4(s_neg)


@dataclasses.dataclass(frozen=True, eq=False)
class ZBox:
    """LRP-zᴮ for bounded inputs ``low <= x <= high``:
    ``R_in = (x⊙Wᵀs − l⊙W⁺ᵀs − h⊙W⁻ᵀs)`` with ``s = R / stab(Wx − W⁺l − W⁻h)``.

    ``low``/``high`` are scalars or arrays broadcastable to one input ``[H, W, C]`` (per pixel).
    """

    low: Any = 0.0
    high: Any = 1.0
    stabilizer: float = 1e-6

    def __call__(self, layer, params, x, relevance):
        low = jnp.broadcast_to(jnp.asarray(self.low, x.dtype), x.shape)
        high = jnp.broadcast_to(jnp.asarray(self.high, x.dtype), x.shape)
        z0, b0 = _vjp(layer, params, x)
        z1, b1 = _vjp(layer, _map(params, _pos, _pos), low)
        z2, b2 = _vjp(layer, _map(params, _neg, _neg), high)
        s = relevance / stabilize(z0 - z1 - z2, self.stabilizer)
        return x * b0(s) - low * b1(s) - high * b2(s)


@dataclasses.dataclass(frozen=True)
class WSquare:
    """LRP-w²: ``R_in = (W²)ᵀ(R / stab(W²·1 + b²))``, independent of the input values."""

    stabilizer: float = 1e-6

    def __call__(self, layer, params, x, relevance):
        z, back = _vjp(layer, _map(params, jnp.square, jnp.square), jnp.ones_like(x))
        return back(relevance / stabilize(z, self.stabilizer))


@dataclasses.dataclass(frozen=True)
class Flat:
    """LRP-flat: w² with all weights 1 and no bias: relevance spread evenly over the receptive field."""

    stabilizer: float = 1e-6

    def __call__(self, layer, params, x, relevance):
        z, back = _vjp(layer, _map(params, jnp.ones_like, _zero), jnp.ones_like(x))
        return back(relevance / stabilize(z, self.stabilizer))


@dataclasses.dataclass(frozen=True)
class Norm:
    """zennit's Norm rule (average pooling, means, residual sums): ``R_in = x ⊙ Jᵀ(R / stab(f(x)))``.

    ``x`` may be a tuple of inputs (the two operands of a sum); the result is then a tuple.
    """

    stabilizer: float = 1e-6

    def __call__(self, layer, params, x, relevance):
        z, back = _vjp(layer, params, x)
        return jax.tree.map(jnp.multiply, x, back(relevance / stabilize(z, self.stabilizer)))


@dataclasses.dataclass(frozen=True)
class Pass:
    """Passes relevance through unchanged (element-wise layers: activations, dropout at eval;
    AttnLRP's identity rule). The node must have one input of its output's shape."""

    def __call__(self, layer, params, x, relevance):
        xs = x if isinstance(x, tuple) else (x,)
        if len(xs) != 1 or xs[0].shape != relevance.shape:
            raise ValueError(
                "the pass rule needs a node with one input of its output's shape; "
                f"got inputs {[tuple(v.shape) for v in xs]} for an output {tuple(relevance.shape)}"
            )
        return (relevance,) if isinstance(x, tuple) else relevance


def _safe_divide(r, z):
    """``r / z``, and 0 where ``z == 0`` (a zero output carries no relevance to share)."""
    zero = z == 0
    return jnp.where(zero, 0, r / jnp.where(zero, 1, z).astype(z.dtype)).astype(r.dtype)


@dataclasses.dataclass(frozen=True)
class Exact:
    """Gradient × input in relevance form: ``R_in = x ⊙ Jᵀ(R / z)``, no stabilizer.

    What AttnLRP (LXT) computes where it leaves the gradient alone: the proportional split of a sum
    (a residual, a position embedding's share), softmax's ``x ⊙ (R − s ΣR)``, a normalization with
    its statistic held constant. ``x`` is a tuple of the node's inputs; so is the result.
    """

    def __call__(self, layer, params, x, relevance):
        z, back = _vjp(layer, params, x)
        return jax.tree.map(jnp.multiply, x, back(_safe_divide(relevance, z)))


@dataclasses.dataclass(frozen=True)
class Uniform:
    """AttnLRP's uniform rule for the product of two activations (q·kᵀ, A·v, a gate): half the
    gradient × input relevance to each operand, ``R_a = ½ a ⊙ J_aᵀ(R / z)``, no stabilizer."""

    def __call__(self, layer, params, x, relevance):
        z, back = _vjp(layer, params, x)
        grads = back(_safe_divide(relevance, z))
        return tuple(0.5 * xi * gi for xi, gi in zip(x, grads, strict=True))


@dataclasses.dataclass(frozen=True)
class ConstantWeights:
    """CP-LRP (Ali et al., 2022) for a product: the attention (or gate) operand held constant, all
    relevance to the other, ``R_v = v ⊙ J_vᵀ(R / z)``; the held operand gets none. Which operand is
    held is the plan's ``node.weights`` (the one a softmax or an element-wise non-linearity made);
    a product with no such operand (q·kᵀ) splits uniformly."""

    def __call__(self, layer, params, x, relevance):
        node = layer.node
        if node.weights is None or len(x) != 2:
            return Uniform()(layer, params, x, relevance)
        held = node.inputs.index(node.weights)

        def apply(free):
            return layer.apply(params, tuple(x[i] if i == held else free for i in range(len(x))))

        free = x[1 - held]
        z, pullback = jax.vjp(apply, free)
        r_free = free * pullback(_safe_divide(relevance, z))[0]
        return tuple(jnp.zeros_like(x[i]) if i == held else r_free for i in range(len(x)))


@dataclasses.dataclass(frozen=True)
class Gradient:
    """Plain vector-Jacobian product: max-pool (winner takes all) and reshapes (flatten).

    ``x`` may be a tuple of inputs (a concatenation); the result is then a tuple.
    """

    def __call__(self, layer, params, x, relevance):
        return _vjp(layer, params, x)[1](relevance)


# Rule names usable in composites and user mappings.
RULES = {
    "epsilon": Epsilon,
    "zplus": ZPlus,
    "alpha_beta": AlphaBeta,
    "alpha2_beta1": AlphaBeta,
    "alpha1_beta0": lambda **kw: AlphaBeta(alpha=1.0, beta=0.0, **kw),
    "gamma": Gamma,
    "zbox": ZBox,
    "wsquare": WSquare,
    "flat": Flat,
    "norm": Norm,
    "pass": Pass,
    "gradient": Gradient,
    "exact": Exact,
    "uniform": Uniform,
    "cp": ConstantWeights,
}
