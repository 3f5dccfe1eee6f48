"""Gradient methods, occlusion and CAMs: exact properties and slow float64 references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

from lenet_jax import explain
from lenet_jax.data import normalized_range
from lenet_jax.explain import cams, gradients
from lenet_jax.models import LeNet5, explained

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def setup(x64_batch):
    model = LeNet5()
    return model, random_params(model, seed=2), x64_batch[:4]


def logit(model, params, x, t):
    return model.apply({"params": params}, x)[jnp.arange(x.shape[0]), t]


def test_saliency_equals_central_finite_differences(setup):
    model, params, x = setup
    t = jnp.array([1, 2, 3, 4])
    g = np.asarray(explain.saliency(explained(model, params), x, t, absolute=False))
    rng = np.random.default_rng(0)
    h = 1e-6
    for _ in range(10):
        i, r, c = rng.integers(4), rng.integers(32), rng.integers(32)
        e = jnp.zeros_like(x).at[i, r, c, 0].set(h)
        fd = (logit(model, params, x + e, t) - logit(model, params, x - e, t))[i] / (2 * h)
        np.testing.assert_allclose(g[i, r, c, 0], fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(explain.saliency(explained(model, params), x, t), np.abs(g))


def test_gradient_x_input_equals_lrp_epsilon_on_a_relu_net_without_biases(setup):
    model = LeNet5(activation="relu", pool="max")
    params = {
        k: {"kernel": v["kernel"], "bias": jnp.zeros_like(v["bias"])}
        for k, v in random_params(model, seed=4).items()
    }
    x = setup[2]
    gxi = explain.gradient_x_input(explained(model, params), x)
    relevance = explain.lrp(explained(model, params), x, composite="epsilon", epsilon=1e-12)
    np.testing.assert_allclose(relevance, gxi, rtol=1e-6, atol=1e-10)


def test_smoothgrad_without_noise_is_the_gradient(setup):
    model, params, x = setup
    sg = explain.smoothgrad(explained(model, params), x, n_samples=1, noise_level=0.0)
    np.testing.assert_allclose(
        sg, explain.saliency(explained(model, params), x, absolute=False), rtol=1e-12
    )


def test_smoothgrad_noise_has_the_asked_std_per_image(setup):
    x = setup[2][:3] * jnp.array([1.0, 0.5, 2.0]).reshape(3, 1, 1, 1)  # three value ranges
    noisy = explain.smoothgrad_noise(x, n_samples=400, noise_level=0.2, key=jax.random.key(3))
    assert noisy.shape == (3, 400, *x.shape[1:])
    noise = np.asarray(noisy - x[:, None]).reshape(3, -1)  # 409,600 draws per image
    sigma = 0.2 * np.asarray(x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))
    np.testing.assert_allclose(noise.std(axis=1), sigma, rtol=0.005)
    assert np.all(np.abs(noise.mean(axis=1)) < 5 * sigma / np.sqrt(noise.shape[1]))
    # an image's copies do not depend on the other images of the batch
    other = explain.smoothgrad_noise(
        x.at[0].set(1.0), n_samples=400, noise_level=0.2, key=jax.random.key(3)
    )
    np.testing.assert_array_equal(other[1:], noisy[1:])


def test_smoothgrad_averages_the_gradients_at_its_noisy_inputs(setup):
    model, params, x = setup
    kw = dict(n_samples=5, noise_level=0.3, key=jax.random.key(9))
    target = jnp.argmax(model.apply({"params": params}, x), axis=-1)  # fixed on the clean input
    noisy = explain.smoothgrad_noise(x, **kw)
    grads = np.stack(
        [
            explain.saliency(explained(model, params), noisy[:, j], target, absolute=False)
            for j in range(kw["n_samples"])
        ],
        axis=1,
    )
    np.testing.assert_allclose(
        explain.smoothgrad(explained(model, params), x, **kw), grads.mean(1), rtol=1e-10
    )
    np.testing.assert_allclose(
        explain.smoothgrad(explained(model, params), x, variant="vargrad", **kw),
        grads.var(1),
        rtol=1e-8,
        atol=1e-14,
    )


def test_smoothgrad_variants_and_chunking_agree(setup):
    model, params, x = setup
    kw = dict(n_samples=8, noise_level=0.1, key=jax.random.key(7))
    whole = explain.smoothgrad(explained(model, params), x, **kw)
    chunked = explain.smoothgrad(explained(model, params), x, batch_size=3, **kw)
    np.testing.assert_allclose(chunked, whole, rtol=1e-10)
    sq = explain.smoothgrad(explained(model, params), x, variant="squared", **kw)
    var = explain.smoothgrad(explained(model, params), x, variant="vargrad", **kw)
    np.testing.assert_allclose(var, sq - whole**2, rtol=1e-6, atol=1e-12)  # Var = E[g²] − E[g]²
    with pytest.raises(ValueError, match="unknown SmoothGrad variant"):
        explain.smoothgrad(explained(model, params), x, variant="smoothest")
    with pytest.raises(ValueError, match="noise_level must be >= 0, got -0.1"):
        explain.smoothgrad(explained(model, params), x, noise_level=-0.1)


@pytest.mark.parametrize("unroll_max", [256, 3])  # unrolled multiply-adds, and the tensordot
def test_weighted_sum_over_the_sample_axis(unroll_max):
    xs = jax.random.normal(jax.random.key(3), (2, 7, 4, 4, 1), jnp.float64)
    w = np.random.default_rng(4).uniform(size=7)
    np.testing.assert_allclose(
        gradients._weighted_sum(w, xs, unroll_max=unroll_max),
        np.einsum("n,bnhwc->bhwc", w, np.asarray(xs)),
        rtol=1e-13,
    )


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre", "riemann_middle"])
def test_integrated_gradients_complete_within_one_percent(setup, method):
    model, params, x = setup
    ig, gap = explain.integrated_gradients(
        explained(model, params),
        x,
        n_steps=64,
        method=method,
        return_gap=True,
        baseline=normalized_range()[0],
    )
    x0 = jnp.full_like(x, normalized_range()[0])
    t = jnp.argmax(model.apply({"params": params}, x), 1)
    delta = logit(model, params, x, t) - logit(model, params, x0, t)
    np.testing.assert_allclose(gap, delta - ig.reshape(4, -1).sum(1), rtol=1e-10, atol=1e-12)
    assert np.all(np.abs(gap) <= 0.01 * np.abs(delta))


def slow_grad_cam(model, params, x, t):
    acts, head = explain.layer_activations(explained(model, params), x[None])
    g = jax.grad(lambda a: head(a)[0, t])(acts)[0]
    a = np.asarray(acts[0])
    w = np.asarray(g).mean((0, 1))
    cam = np.zeros(a.shape[:2])
    for k in range(a.shape[-1]):
        cam += w[k] * a[:, :, k]
    return np.maximum(cam, 0)


def test_grad_cam_matches_the_papers_definition(setup):
    model, params, x = setup
    t = jnp.array([0, 5, 7, 2])
    low = explain.grad_cam(explained(model, params), x, t, upsample=False)
    chex.assert_shape(low, (4, 10, 10))
    for i in range(4):
        np.testing.assert_allclose(
            low[i], slow_grad_cam(model, params, x[i], int(t[i])), rtol=1e-9, atol=1e-12
        )
    up = explain.grad_cam(explained(model, params), x, t, normalize=True)
    chex.assert_shape(up, (4, 32, 32))
    assert float(up.min()) >= 0.0 and np.allclose(up.max((1, 2)), 1.0)


def test_score_cam_matches_the_definition(setup):
    model, params, x = setup
    cam = explain.score_cam(explained(model, params), x, target=3, upsample=False)
    for i in range(4):
        acts, _ = explain.layer_activations(explained(model, params), x[i : i + 1])
        a = np.asarray(acts[0])  # [10, 10, 16]
        scores = []
        for k in range(a.shape[-1]):
            up = np.asarray(jax.image.resize(jnp.asarray(a[:, :, k]), (32, 32), "bilinear"))
            span = up.max() - up.min()
            mask = (up - up.min()) / span if span > 0 else np.zeros_like(up)
            masked = np.asarray(x[i]) * mask[:, :, None]
            scores.append(float(model.apply({"params": params}, jnp.asarray(masked)[None])[0, 3]))
        w = np.exp(np.array(scores) - max(scores))
        w /= w.sum()
        ref = np.maximum(np.tensordot(a, w, axes=([2], [0])), 0)
        np.testing.assert_allclose(cam[i], ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n_in, n_out", [(10, 32), (5, 32), (14, 28), (32, 32), (1, 4)])
def test_cam_upsampling(n_in, n_out):
    maps = jnp.asarray(np.random.default_rng(1).normal(size=(2, n_in, n_in)))
    np.testing.assert_allclose(
        cams._upsample(maps, (n_out, n_out)),
        jax.image.resize(maps, (2, n_out, n_out), "bilinear"),
        rtol=1e-12,
        atol=1e-12,
    )
    # aligned corners: a ramp 0..n_in-1 is sampled at evenly spaced points from 0 to n_in-1
    ramp = cams.interpolation_matrix(n_in, n_out, align_corners=True) @ np.arange(n_in)
    expected = np.linspace(0, n_in - 1, n_out) if n_out > 1 else np.zeros(1)
    np.testing.assert_allclose(ramp, expected, rtol=0, atol=1e-12)


def test_occlusion_matches_a_window_by_window_loop(setup):
    model, params, x = setup
    base = normalized_range()[0]
    f = explained(model, params)
    ours = np.asarray(explain.occlusion(f, x[:1], target=2, window=8, stride=8, baseline=base))
    ref = np.zeros((32, 32))
    clean = float(logit(model, params, x[:1], jnp.array([2]))[0])
    for r in range(0, 25, 8):
        for c in range(0, 25, 8):
            occ = x[:1].at[:, r : r + 8, c : c + 8, :].set(base)
            ref[r : r + 8, c : c + 8] = clean - float(logit(model, params, occ, jnp.array([2]))[0])
    np.testing.assert_allclose(ours[0, :, :, 0], ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(explain.METHODS))
def test_every_method_is_jittable_batch_consistent_and_finite(name, setup):
    model, params, x = setup
    opts = {"n_samples": 4} if name == "smoothgrad" else {}
    if name == "integrated_gradients":
        opts = {"n_steps": 8}
    eager = explain.attribute(name, explained(model, params), x, jnp.array([1, 1, 2, 3]), **opts)
    jitted = jax.jit(lambda p, v, t: explain.attribute(name, explained(model, p), v, t, **opts))(
        params, x, jnp.array([1, 1, 2, 3])
    )
    np.testing.assert_allclose(jitted, eager, rtol=1e-9, atol=1e-12)
    expected = x.shape[:3] if name in explain.CAM_METHODS else x.shape
    chex.assert_shape(eager, expected)
    if name != "smoothgrad":  # per-sample noise keys depend on the batch position
        single = explain.attribute(name, explained(model, params), x[2:3], 2, **opts)
        np.testing.assert_allclose(single[0], eager[2], rtol=1e-9, atol=1e-12)
    chex.assert_tree_all_finite(
        explain.attribute(name, explained(model, params), jnp.zeros_like(x), **opts)
    )


def test_unknown_method_and_layer_list_the_choices(setup):
    model, params, x = setup
    with pytest.raises(ValueError, match=r"unknown method 'lime'; choose one of \['grad_cam'"):
        explain.attribute("lime", explained(model, params), x)
    with pytest.raises(
        ValueError,
        match=r"layer 'fc1' is not a feature map \[B, h, w, K\]; choose one of \['conv1', 'conv2'\]",
    ):
        explain.grad_cam(explained(model, params), x, layer="fc1")


def test_method_options_are_the_keyword_options_with_their_defaults():
    assert explain.method_options("smoothgrad") == {
        "n_samples": 50,
        "noise_level": 0.15,
        "variant": "smoothgrad",
        "key": None,
        "batch_size": None,
    }
    assert explain.method_options("gradient_x_input") == {"batch_size": None}
    with pytest.raises(ValueError, match=r"unknown method 'lime'; choose one of \['grad_cam'"):
        explain.method_options("lime")
