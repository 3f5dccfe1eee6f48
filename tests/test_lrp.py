"""LRP: every rule against a slow float64 reference, the engine's operation table, conservation,
errors, jit/vmap."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params
from jax import lax

from lenet_jax.explain import (
    COMPOSITES,
    composite_rules,
    conservation,
    grad_cam,
    layer_names,
    lrp,
)
from lenet_jax.explain import lrp_layerwise as lrp_layerwise_f
from lenet_jax.explain import rules as R
from lenet_jax.explain.engine import plan
from lenet_jax.explain.graph import trace
from lenet_jax.models import LeNet5, explained

pytestmark = pytest.mark.usefixtures("float64")


@dataclasses.dataclass(frozen=True)
class Dense:
    """A layer as the rules see it: ``apply(params, x)``."""

    features: int
    kind = "dense"

    def apply(self, params, x):
        return x @ params["kernel"] + params["bias"][None]


@dataclasses.dataclass(frozen=True)
class Conv:
    features: int
    kernel_size: tuple
    kind = "conv"

    def apply(self, params, x):
        dn = ("NHWC", "HWIO", "NHWC")
        y = lax.conv_general_dilated(x, params["kernel"], (1, 1), "VALID", dimension_numbers=dn)
        return y + params["bias"].reshape(1, 1, 1, -1)


def lrp_layerwise(model, params, x, target=None, **kw):
    return lrp_layerwise_f(explained(model, params), x, target, **kw)


# ----------------------------------------------------------- slow references, from the definitions
# A layer is linear: z = W x + b with an explicit matrix W [out, in] (via jax.jacobian for a conv,
# as zennit's tests do). Every rule is written with explicit sums over that matrix.


def dense_matrix(layer, params, x_shape):
    zero = {"kernel": params["kernel"], "bias": jnp.zeros_like(params["bias"])}
    f = lambda v: layer.apply(zero, v.reshape((1, *x_shape))).ravel()  # noqa: E731
    return np.asarray(jax.jacobian(f)(jnp.zeros(int(np.prod(x_shape)), jnp.float64)))


def bias_vector(layer, params, x_shape):
    zero_x = jnp.zeros((1, *x_shape), jnp.float64)
    return np.asarray(layer.apply(params, zero_x)).ravel()


def stab(z, eps):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def ref_rule(name, W, b, x, r, *, eps=1e-6, gamma=0.25, low=None, high=None, alpha=2.0, beta=1.0):
    """Input relevance of one sample: W [out, in], b [out], x [in], r [out]."""
    P, N = np.maximum(W, 0), np.minimum(W, 0)
    xp, xn = np.maximum(x, 0), np.minimum(x, 0)
    bp, bn = np.maximum(b, 0), np.minimum(b, 0)
    if name == "epsilon":
        z = W @ x + b
        return x * (W.T @ (r / stab(z, eps)))
    if name == "zplus":
        z = P @ xp + N @ xn + bp
        return xp * (P.T @ (r / stab(z, eps))) + xn * (N.T @ (r / stab(z, eps)))
    if name == "alpha_beta":
        zpos = P @ xp + N @ xn + bp
        zneg = N @ xp + P @ xn + bn
        pos = xp * (P.T @ (r / stab(zpos, eps))) + xn * (N.T @ (r / stab(zpos, eps)))
        neg = xp * (N.T @ (r / stab(zneg, eps))) + xn * (P.T @ (r / stab(zneg, eps)))
        return alpha * pos - beta * neg
    if name == "gamma":
        Wu, Wd = W + gamma * P, W + gamma * N
        z = W @ x + b
        zu = Wu @ xp + Wd @ xn + b + gamma * bp
        zd = Wd @ xp + Wu @ xn + b + gamma * bn
        su = (z > 0) * r / stab(zu, eps)
        sd = (z < 0) * r / stab(zd, eps)
        return xp * (Wu.T @ su) + xn * (Wd.T @ su) + xp * (Wd.T @ sd) + xn * (Wu.T @ sd)
    if name == "zbox":
        z = W @ x - P @ low - N @ high
        s = r / stab(z, eps)
        return x * (W.T @ s) - low * (P.T @ s) - high * (N.T @ s)
    if name == "wsquare":
        W2 = W**2
        z = W2.sum(1) + b**2
        return W2.T @ (r / stab(z, eps))
    if name == "flat":
        ones = (W != 0).astype(float)  # the receptive field
        return ones.T @ (r / stab(ones.sum(1), eps))
    raise KeyError(name)


RULE_CASES = {
    "epsilon": (R.Epsilon(1e-3), {"eps": 1e-3}),
    "zplus": (R.ZPlus(), {}),
    "alpha_beta": (R.AlphaBeta(2.0, 1.0), {}),
    "alpha3_beta2": (R.AlphaBeta(3.0, 2.0), {"alpha": 3.0, "beta": 2.0}),
    "gamma": (R.Gamma(0.5), {"gamma": 0.5}),
    "zbox": (R.ZBox(-0.5, 1.5), {"low": -0.5, "high": 1.5}),
    "wsquare": (R.WSquare(), {}),
    "flat": (R.Flat(), {}),
}

LAYERS = {
    "dense": (Dense(7), (3, 11)),
    "conv": (Conv(4, (3, 3)), (3, 7, 7, 2)),
}


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_rule_matches_the_slow_float64_definition(case, layer_name):
    rule, kw = RULE_CASES[case]
    layer, x_shape = LAYERS[layer_name]
    seed = sorted(RULE_CASES).index(case) * 2 + sorted(LAYERS).index(layer_name)
    k = jax.random.split(jax.random.key(seed), 4)
    if layer.kind == "dense":
        kernel_shape = (x_shape[-1], layer.features)
    else:
        kernel_shape = (*layer.kernel_size, x_shape[-1], layer.features)
    params = {
        "kernel": jax.random.normal(k[0], kernel_shape, jnp.float64),
        "bias": 0.5 * jax.random.normal(k[1], (layer.features,), jnp.float64),
    }
    x = jax.random.normal(k[2], x_shape, jnp.float64)
    z = layer.apply(params, x)
    r_out = jax.random.normal(k[3], z.shape, jnp.float64)
    ours = np.asarray(rule(layer, params, x, r_out))
    chex.assert_shape(ours, x_shape)
    W = dense_matrix(layer, params, x_shape[1:])
    b = bias_vector(layer, params, x_shape[1:])
    name = "alpha_beta" if case.startswith("alpha") else case
    for i in range(x_shape[0]):
        xi = np.asarray(x[i]).ravel()
        extra = {}
        if name == "zbox":
            extra = {"low": np.full_like(xi, kw["low"]), "high": np.full_like(xi, kw["high"])}
        kws = {k_: v for k_, v in kw.items() if k_ not in ("low", "high")}
        ref = ref_rule(name, W, b, xi, np.asarray(r_out[i]).ravel(), **kws, **extra)
        np.testing.assert_allclose(ours[i].ravel(), ref, rtol=1e-9, atol=1e-12)


def test_zbox_accepts_per_pixel_bounds():
    layer, params = (
        Conv(2, (3, 3)),
        {
            "kernel": jax.random.normal(jax.random.key(0), (3, 3, 1, 2), jnp.float64),
            "bias": jnp.zeros(2, jnp.float64),
        },
    )
    x = jax.random.uniform(jax.random.key(1), (2, 5, 5, 1), jnp.float64)
    low = jnp.zeros((5, 5, 1)).at[2, 2, 0].set(-1.0).at[1, 3, 0].set(-2.0)
    r = jnp.ones((2, 3, 3, 2), jnp.float64)
    per_pixel = R.ZBox(low, 1.0)(layer, params, x, r)
    scalar = R.ZBox(0.0, 1.0)(layer, params, x, r)
    assert not np.allclose(per_pixel, scalar)
    W = dense_matrix(layer, params, (5, 5, 1))
    lo = np.asarray(low).ravel()
    ref = ref_rule(
        "zbox", W, np.zeros(18), np.asarray(x[0]).ravel(), np.ones(18), low=lo, high=np.ones(25)
    )
    np.testing.assert_allclose(np.asarray(per_pixel[0]).ravel(), ref, rtol=1e-9)


def test_stabilizer_treats_zero_as_positive():
    np.testing.assert_array_equal(R.stabilize(jnp.array([-2.0, 0.0, 3.0]), 0.5), [-2.5, 0.5, 3.5])


# ------------------------------------------------------------------------- whole-model properties


def zero_bias(params):
    return {
        k: {"kernel": v["kernel"], "bias": jnp.zeros_like(v["bias"])} for k, v in params.items()
    }


BOUNDS = {"low": -0.4242, "high": 2.8215}  # MNIST's normalized black and white


@pytest.mark.parametrize("composite", sorted(COMPOSITES))
@pytest.mark.parametrize("activation,pool", [("tanh", "avg"), ("relu", "max")])
def test_conservation_layer_by_layer_with_zero_biases(composite, activation, pool, x64_batch):
    model = LeNet5(activation=activation, pool=pool)
    params = zero_bias(random_params(model, seed=3))
    rels = lrp_layerwise(
        model, params, x64_batch, composite=composite, epsilon=1e-12, stabilizer=1e-12, **BOUNDS
    )
    logits = model.apply({"params": params}, x64_batch)
    target_logit = jnp.max(logits, axis=1)
    sums = conservation(rels)
    # the layers, and every node between them (activations, pooling, the flatten)
    assert {"input", "conv1", "conv2", "fc1", "fc2", "fc3", "elementwise", "structural"} <= set(
        sums
    )
    for name, s in sums.items():
        np.testing.assert_allclose(s, target_logit, rtol=1e-5, err_msg=name)


def test_relevance_of_the_last_conv_feature_maps(x64_batch, lenet):
    params = random_params(lenet)
    rels = lrp_layerwise(lenet, params, x64_batch, target=3)
    chex.assert_shape(rels["conv2"], (8, 10, 10, 16))
    chex.assert_shape(rels["fc3"], (8, 10))
    np.testing.assert_array_equal(np.asarray(rels["fc3"])[:, [0, 1, 2, 4]], 0.0)
    np.testing.assert_allclose(rels["fc3"][:, 3], lenet.apply({"params": params}, x64_batch)[:, 3])
    f = explained(lenet, params)
    np.testing.assert_array_equal(rels["input"], lrp(f, x64_batch, target=3))


def test_targets_none_int_and_array_agree(x64_batch, lenet):
    f = explained(lenet, random_params(lenet))
    pred = jnp.argmax(f(x64_batch), 1)
    a = lrp(f, x64_batch)
    np.testing.assert_array_equal(a, lrp(f, x64_batch, target=pred))
    np.testing.assert_array_equal(lrp(f, x64_batch, target=int(pred[0]))[0], a[0])


def test_user_composite_mapping_equals_the_named_composite(x64_batch, lenet):
    f = explained(lenet, random_params(lenet))
    mapping = {
        "conv1": "flat",
        "conv2": "zplus",
        "fc1": "epsilon",
        "fc2": "epsilon",
        "fc3": R.Epsilon(1e-6),
    }
    np.testing.assert_array_equal(
        lrp(f, x64_batch, composite=mapping), lrp(f, x64_batch, composite="epsilon_plus_flat")
    )
    p = plan(trace(f, x64_batch))
    rules = composite_rules(p, "epsilon_gamma_box", gamma=0.5, **BOUNDS)
    assert list(rules) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert isinstance(rules["conv1"], R.ZBox) and rules["conv2"] == R.Gamma(0.5)
    assert rules["fc1"] == R.Epsilon(1e-6)
    assert [n.kind for n in p.nodes] == [
        "conv", "elementwise", "sum", "conv", "elementwise", "sum", "structural",
        "dense", "elementwise", "dense", "elementwise", "dense",
    ]  # fmt: skip


def mlp(x):
    w = jnp.linspace(-1.0, 1.0, 12 * 5, dtype=x.dtype).reshape(12, 5)
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w[:, :4]) @ w[:4, :3]


@pytest.mark.parametrize(
    "composite, first",
    [("epsilon_gamma_box", "Epsilon"), ("epsilon_plus_flat", "Flat"), ("epsilon", "Epsilon")],
)
def test_first_layer_follows_zennit(composite, first):
    """zennit's ``*_flat`` composites take the first linear layer of either kind; EpsilonGammaBox
    only the first convolution, so an MLP gets no zB."""
    x = jnp.ones((2, 3, 4), jnp.float64)
    rules = composite_rules(plan(trace(mlp, x)), composite, **BOUNDS)
    assert list(rules) == ["dense_0", "dense_1"]
    assert type(rules["dense_0"]).__name__ == first
    assert type(rules["dense_1"]).__name__ == "Epsilon"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"composite": "epsilon_minus"},
            r"unknown composite 'epsilon_minus'; choose one of \['attn_lrp', 'cp_lrp', 'epsilon'",
        ),
        (
            {
                "composite": {
                    "conv1": "zminus",
                    "conv2": "zplus",
                    "fc1": "epsilon",
                    "fc2": "epsilon",
                    "fc3": "epsilon",
                }
            },
            r"unknown LRP rule 'zminus'; choose one of",
        ),
        (
            {"composite": {"conv9": "zplus"}},
            r"composite names unknown layers \['conv9'\]; the layers are \['conv1'",
        ),
        (
            {"composite": {"conv1": "flat"}},
            r"composite gives no rule for the layers \['conv2', 'fc1'",
        ),
        ({"composite": "epsilon_gamma_box"}, r"the zB rule needs the input bounds: pass low="),
        ({"target": 10}, r"target 10 out of range: the model has classes 0..9"),
        ({"target": -1}, r"target -1 out of range"),
        ({"target": jnp.array([1, 2])}, r"target must be a scalar or have shape \[8\]"),
    ],
)
def test_bad_arguments_name_the_valid_choices(kwargs, message, x64_batch, lenet):
    with pytest.raises(ValueError, match=message):
        lrp(explained(lenet, random_params(lenet)), x64_batch, **kwargs)


def test_wrong_inputs_are_rejected(lenet):
    f = explained(lenet, random_params(lenet))
    with pytest.raises(ValueError, match=r"expected a batch of inputs \[B, ...\]"):
        lrp(f, jnp.zeros(4))
    with pytest.raises(ValueError, match="expected a float input"):
        lrp(f, jnp.zeros((4, 32, 32, 1), jnp.int32))
    with pytest.raises(ValueError, match="AlphaBeta needs alpha, beta >= 0 and alpha - beta = 1"):
        R.AlphaBeta(2.0, 2.0)


@pytest.mark.parametrize("composite", sorted(COMPOSITES))
def test_zero_and_huge_inputs_keep_relevance_finite_and_conserved(composite, lenet):
    # no biases: every rule conserves, so the input relevance sums to the target logit: exactly 0
    # for a zero input, the saturated network's logit at 1e6 (ε absorbs ~1e-6 of it)
    f = explained(lenet, random_params(lenet, bias_scale=0.0, dtype=jnp.float32))
    zero = jnp.zeros((2, 32, 32, 1), jnp.float32)
    np.testing.assert_array_equal(lrp(f, zero, composite=composite, **BOUNDS), 0.0)
    huge = jnp.full((2, 32, 32, 1), 1e6, jnp.float32)
    relevance = lrp(f, huge, composite=composite, **BOUNDS)
    chex.assert_tree_all_finite(relevance)
    logits = f(huge)
    total = relevance.reshape(2, -1).sum(1)
    np.testing.assert_allclose(total, logits.max(1), rtol=1e-3)
    assert float(logits.max(1).min()) > 0.1


class TestJitAndBatching(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_eager_and_batch_equals_per_sample(self):
        model = LeNet5()
        params = random_params(model, seed=5)
        x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1), jnp.float64)
        f = self.variant(
            lambda p, x, t: lrp(
                functools.partial(model.apply, {"params": p}), x, t,
                composite="epsilon_gamma_box", **BOUNDS,
            )
        )  # fmt: skip
        target = jnp.array([3, 9])
        batched = f(params, x, target)
        single = jnp.concatenate([f(params, x[i : i + 1], target[i : i + 1]) for i in range(2)])
        np.testing.assert_allclose(batched, single, rtol=1e-10, atol=1e-14)
        vmapped = jax.vmap(lambda xi, ti: f(params, xi[None], ti[None])[0])(x, target)
        np.testing.assert_allclose(vmapped, batched, rtol=1e-10, atol=1e-14)


def test_chunked_lrp_equals_one_batch(x64_batch, lenet):
    f = explained(lenet, random_params(lenet))
    whole = lrp(f, x64_batch, composite="epsilon_alpha2_beta1")
    chunked = lrp(f, x64_batch, composite="epsilon_alpha2_beta1", batch_size=3)
    np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ the engine's operation table


def one_conv(x, *, strides=(1, 1), dilation=(1, 1), groups=1, padding="VALID"):
    """A model of one convolution (any stride, padding, dilation, groups), then a flatten."""
    cin, cout = x.shape[-1], 4
    k = jnp.sin(jnp.arange(3 * 3 * cin // groups * cout, dtype=x.dtype)).reshape(3, 3, -1, cout)
    y = lax.conv_general_dilated(
        x, k, strides, padding, rhs_dilation=dilation, feature_group_count=groups,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    y = y + 0.1 * jnp.arange(cout, dtype=x.dtype).reshape(1, 1, 1, -1)
    return y.reshape(y.shape[0], -1)


@pytest.mark.parametrize(
    "options",
    [{}, {"strides": (2, 2)}, {"dilation": (2, 1)}, {"groups": 2}, {"padding": ((1, 2), (0, 1))}],
    ids=["plain", "stride", "dilation", "groups", "padding"],
)
def test_any_convolution_follows_the_epsilon_definition(options):
    x = jax.random.normal(jax.random.key(2), (2, 9, 8, 2), jnp.float64)
    f = functools.partial(one_conv, **options)
    target = jnp.array([3, 7])
    ours = np.asarray(lrp(f, x, target, composite="epsilon", epsilon=1e-3))
    jac = jax.jacobian(lambda v: f(v.reshape(1, *x.shape[1:]))[0])
    for i in range(2):
        xi = np.asarray(x[i]).ravel()
        W = np.asarray(jac(jnp.zeros(xi.size, jnp.float64)))
        b = np.asarray(f(jnp.zeros((1, *x.shape[1:]), jnp.float64))[0])
        z = W @ xi + b
        r = np.zeros_like(z)
        r[target[i]] = z[target[i]]
        ref = ref_rule("epsilon", W, b, xi, r, eps=1e-3)
        np.testing.assert_allclose(ours[i].ravel(), ref, rtol=1e-9, atol=1e-12)


def scoped_mlp(act, x):
    """Dense -> ``act`` (in scope "act") -> dense."""
    w1 = jnp.cos(jnp.arange(6 * 5, dtype=x.dtype)).reshape(6, 5)
    w2 = jnp.sin(jnp.arange(5 * 3, dtype=x.dtype)).reshape(5, 3)
    with jax.named_scope("fc1"):
        h = x @ w1
    with jax.named_scope("act"):
        h = act(h)
    with jax.named_scope("fc2"):
        return h @ w2


ACTIVATIONS = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "elu": jax.nn.elu,
    "leaky_relu": jax.nn.leaky_relu,
    "jit_softplus": jax.jit(jax.nn.softplus),
    "clip": lambda h: jnp.clip(2.0 * h - 1.0, -1.0, 1.0),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_elementwise_activations_pass_relevance_unchanged(name):
    f = functools.partial(scoped_mlp, ACTIVATIONS[name])
    x = jax.random.normal(jax.random.key(3), (4, 6), jnp.float64)
    rel = lrp_layerwise_f(f, x, composite="epsilon")
    assert layer_names(f, x) == ["fc1", "fc2"]
    np.testing.assert_array_equal(rel["act"], rel["fc1"])
    assert np.abs(np.asarray(rel["act"])).max() > 0


def test_sums_and_means_use_the_norm_rule():
    """A residual ``h + x`` and a mean: zennit's Norm rule, ``R_i = v_i R / Σ v``."""

    def f(x):
        w = jnp.cos(jnp.arange(16, dtype=x.dtype)).reshape(4, 4)
        with jax.named_scope("branch"):
            h = x @ w
        with jax.named_scope("sum"):
            s = h + x
        return jnp.mean(s.reshape(s.shape[0], 2, 2), axis=2) @ w[:2, :3]

    x = jax.random.normal(jax.random.key(4), (3, 4), jnp.float64) + 2.0
    rel = lrp_layerwise_f(f, x, 1, composite="epsilon", epsilon=0.0, stabilizer=0.0)
    h = x @ jnp.cos(jnp.arange(16, dtype=x.dtype)).reshape(4, 4)
    r_sum = rel["sum"]
    np.testing.assert_allclose(rel["branch"], h * r_sum / (h + x), rtol=1e-10)
    # the mean passes the sum's relevance on whole: Σ R(sum) = the target logit
    np.testing.assert_allclose(r_sum.sum(1), f(x)[:, 1], rtol=1e-10)


@pytest.mark.parametrize(
    "op, name",
    [(jnp.sort, "sort"), (functools.partial(jnp.cumsum, axis=-1), "cumsum")],
)
def test_an_operation_without_a_rule_is_a_one_line_error(op, name):
    def f(x):
        with jax.named_scope("fc1"):
            h = x @ jnp.ones((6, 5), x.dtype)
        with jax.named_scope("mix"):
            h = op(h)
        return h @ jnp.ones((5, 3), x.dtype)

    with pytest.raises(ValueError) as err:
        lrp(f, jnp.ones((2, 6), jnp.float64))
    assert str(err.value).startswith(f"no LRP rule for the operation '{name}' in layer 'mix': ")
    assert "\n" not in str(err.value)
    # gradient methods need no rule
    assert np.isfinite(np.asarray(jax.grad(lambda v: f(v).sum())(jnp.ones((2, 6))))).all()


def test_a_model_whose_output_ignores_the_input_is_rejected():
    with pytest.raises(ValueError, match="the model's output does not depend on its input"):
        lrp(lambda x: jnp.ones((x.shape[0], 3)), jnp.ones((2, 4)))


def test_a_model_must_map_one_array_to_one_array_of_logits():
    with pytest.raises(ValueError, match=r"^the model must map one array to one array of logits"):
        lrp(lambda x: (x.sum(1), x.sum(1)), jnp.ones((2, 4)))
    linear = lambda x: x.reshape(x.shape[0], -1) @ jnp.ones((16, 3))  # noqa: E731
    with pytest.raises(ValueError, match=r"^unknown layer 'conv9'; the convolutions are \[\]"):
        grad_cam(linear, jnp.ones((2, 4, 4, 1)), layer="conv9")
    with pytest.raises(ValueError, match=r"^the model has no convolution for a CAM"):
        grad_cam(linear, jnp.ones((2, 4, 4, 1)))
