"""LRP: every rule against a slow float64 reference, conservation, errors, jit/vmap."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

from lenet_jax.explain import COMPOSITES, composite_rules, conservation, lrp, lrp_layerwise
from lenet_jax.explain import rules as R
from lenet_jax.layers import Conv, Dense
from lenet_jax.models import LeNet5

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
    "dense": (Dense("d", 7), (3, 11)),
    "conv": (Conv("c", 4, (3, 3)), (3, 7, 7, 2)),
}


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_rule_matches_the_slow_float64_definition(case, layer_name):
    rule, kw = RULE_CASES[case]
    layer, x_shape = LAYERS[layer_name]
    k = jax.random.split(jax.random.key(hash((case, layer_name)) % 2**31), 4)
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
        Conv("c", 2, (3, 3)),
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


@pytest.mark.parametrize("composite", sorted(COMPOSITES))
@pytest.mark.parametrize("activation,pool", [("tanh", "avg"), ("relu", "max")])
def test_conservation_layer_by_layer_with_zero_biases(composite, activation, pool, x64_batch):
    model = LeNet5(activation=activation, pool=pool)
    params = zero_bias(random_params(model, seed=3))
    rels = lrp_layerwise(
        model, params, x64_batch, composite=composite, epsilon=1e-12, stabilizer=1e-12
    )
    logits = model.apply({"params": params}, x64_batch)
    target_logit = jnp.max(logits, axis=1)
    sums = conservation(rels)
    assert set(sums) == {"input"} | {layer.name for layer in model.layers}
    for name, s in sums.items():
        np.testing.assert_allclose(s, target_logit, rtol=1e-5, err_msg=name)


def test_relevance_of_the_last_conv_feature_maps(x64_batch, lenet):
    params = random_params(lenet)
    rels = lrp_layerwise(lenet, params, x64_batch, target=3)
    chex.assert_shape(rels["conv2"], (8, 10, 10, 16))
    chex.assert_shape(rels["fc3"], (8, 10))
    np.testing.assert_array_equal(np.asarray(rels["fc3"])[:, [0, 1, 2, 4]], 0.0)
    np.testing.assert_allclose(rels["fc3"][:, 3], lenet.apply({"params": params}, x64_batch)[:, 3])
    np.testing.assert_array_equal(rels["input"], lrp(lenet, params, x64_batch, target=3))
    # activations pass relevance unchanged
    np.testing.assert_array_equal(rels["conv2"], rels["act2"])


def test_targets_none_int_and_array_agree(x64_batch, lenet):
    params = random_params(lenet)
    pred = jnp.argmax(lenet.apply({"params": params}, x64_batch), 1)
    a = lrp(lenet, params, x64_batch)
    b = lrp(lenet, params, x64_batch, target=pred)
    np.testing.assert_array_equal(a, b)
    c = lrp(lenet, params, x64_batch, target=int(pred[0]))
    np.testing.assert_array_equal(c[0], a[0])


def test_user_composite_mapping_equals_the_named_composite(x64_batch, lenet):
    params = random_params(lenet)
    mapping = {
        "conv1": "flat",
        "conv2": "zplus",
        "fc1": "epsilon",
        "fc2": "epsilon",
        "fc3": R.Epsilon(1e-6),
    }
    np.testing.assert_array_equal(
        lrp(lenet, params, x64_batch, composite=mapping),
        lrp(lenet, params, x64_batch, composite="epsilon_plus_flat"),
    )
    rules = composite_rules(lenet.layers, "epsilon_gamma_box", gamma=0.5)
    assert isinstance(rules[0], R.ZBox) and rules[3] == R.Gamma(0.5)
    assert [type(r).__name__ for r in rules[4:7]] == ["Pass", "Norm", "Gradient"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"composite": "epsilon_minus"},
            r"unknown composite 'epsilon_minus'; choose one of \['epsilon'",
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
        ({"target": 10}, r"target 10 out of range: the model has classes 0..9"),
        ({"target": -1}, r"target -1 out of range"),
        ({"target": jnp.array([1, 2])}, r"target must be a scalar or have shape \[8\]"),
    ],
)
def test_bad_arguments_name_the_valid_choices(kwargs, message, x64_batch, lenet):
    with pytest.raises(ValueError, match=message):
        lrp(lenet, random_params(lenet), x64_batch, **kwargs)


def test_wrong_input_shape_is_rejected(lenet):
    with pytest.raises(
        ValueError,
        match=r"expected a normalized NHWC batch of shape \[B, 32, 32, 1\], got \(4, 28, 28\)",
    ):
        lrp(lenet, random_params(lenet), jnp.zeros((4, 28, 28)))
    with pytest.raises(ValueError, match="AlphaBeta needs alpha, beta >= 0 and alpha - beta = 1"):
        R.AlphaBeta(2.0, 2.0)


@pytest.mark.parametrize("composite", sorted(COMPOSITES))
def test_relevance_is_finite_for_zero_and_huge_inputs(composite, lenet):
    params = random_params(lenet, dtype=jnp.float32)
    for x in (jnp.zeros((2, 32, 32, 1), jnp.float32), jnp.full((2, 32, 32, 1), 1e6, jnp.float32)):
        chex.assert_tree_all_finite(lrp(lenet, params, x, composite=composite))


class TestJitAndBatching(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_eager_and_batch_equals_per_sample(self):
        model = LeNet5()
        params = random_params(model, seed=5)
        x = jax.random.normal(jax.random.key(0), (5, 32, 32, 1), jnp.float64)
        f = self.variant(lambda p, x, t: lrp(model, p, x, t, composite="epsilon_gamma_box"))
        target = jnp.array([0, 3, 9, 1, 1])
        batched = f(params, x, target)
        single = jnp.concatenate([f(params, x[i : i + 1], target[i : i + 1]) for i in range(5)])
        np.testing.assert_allclose(batched, single, rtol=1e-10, atol=1e-14)
        vmapped = jax.vmap(lambda xi, ti: f(params, xi[None], ti[None])[0])(x, target)
        np.testing.assert_allclose(vmapped, batched, rtol=1e-10, atol=1e-14)


def test_chunked_lrp_equals_one_batch(x64_batch, lenet):
    params = random_params(lenet)
    whole = lrp(lenet, params, x64_batch, composite="epsilon_alpha2_beta1")
    chunked = lrp(lenet, params, x64_batch, composite="epsilon_alpha2_beta1", batch_size=3)
    np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=1e-15)
