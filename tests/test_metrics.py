"""Metrics of explanations on models whose true relevance is known, and their exact properties."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lenet_jax import explain
from lenet_jax.data import normalized_range
from lenet_jax.explain import metrics
from lenet_jax.models import LeNet5, ViT, init_params

pytestmark = pytest.mark.usefixtures("float64")


BOUNDS = normalized_range("mnist")  # (black, white) of the normalized pixels


class Linear(nn.Module):
    """logits = W·vec(x) + b on 16x16 inputs: the relevance of pixel i is w_i (x_i − black)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="fc")(x.reshape((x.shape[0], -1)))


def apply(model, params, x):
    return model.apply({"params": params}, x)


def f_of(model, params):
    return functools.partial(apply, model, params)


@pytest.fixture
def linear():
    model = Linear()
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"]
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    x = jax.random.normal(jax.random.key(1), (6, 16, 16, 1), jnp.float64)
    target = jnp.array([0, 1, 2, 0, 1, 2])
    w = params["fc"]["kernel"][:, target].T.reshape(6, 16, 16, 1)
    exact = w * (x - BOUNDS[0])
    return f_of(model, params), x, target, exact


def test_morf_curve_is_the_greedy_cumulative_sum_of_true_contributions(linear):
    f, x, target, exact = linear
    out = metrics.pixel_flipping(f, x, target, exact, order="morf", n_steps=256, bounds=BOUNDS)
    logits = f(x)[jnp.arange(6), target]
    contributions = -np.sort(-np.asarray(exact).reshape(6, -1), axis=1)
    expected = np.asarray(logits)[:, None] - np.concatenate(
        [np.zeros((6, 1)), np.cumsum(contributions, axis=1)], axis=1
    )
    np.testing.assert_allclose(out["logit"], expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(out["aopc"], (out["prob"][:, :1] - out["prob"]).mean(1), rtol=1e-12)
    assert out["fraction"][0] == 0 and out["fraction"][-1] == 1


def test_the_exact_attribution_beats_random_on_morf_and_lerf(linear):
    f, x, target, exact = linear
    kw = dict(patch=2, n_steps=16, bounds=BOUNDS)
    morf = metrics.pixel_flipping(f, x, target, exact, order="morf", **kw)
    lerf = metrics.pixel_flipping(f, x, target, exact, order="lerf", **kw)
    rand = metrics.pixel_flipping(f, x, target, exact, order="random", **kw)
    assert np.all(np.asarray(morf["logit"]) <= np.asarray(rand["logit"]) + 1e-9)
    assert np.all(np.asarray(lerf["logit"]) >= np.asarray(rand["logit"]) - 1e-9)
    assert float(morf["aopc"].mean()) > float(rand["aopc"].mean()) > float(lerf["aopc"].mean())


def test_random_attribution_gives_morf_close_to_lerf():
    model = LeNet5()
    params = init_params(model, jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (64, 32, 32, 1))
    f = f_of(model, params)
    target = jnp.argmax(f(x), 1)
    noise = metrics.random_attribution(x, jax.random.key(9))
    kw = dict(patch=4, n_steps=8, bounds=BOUNDS)
    morf = metrics.pixel_flipping(f, x, target, noise, order="morf", **kw)
    lerf = metrics.pixel_flipping(f, x, target, noise, order="lerf", **kw)
    gap = np.asarray(morf["logit"] - lerf["logit"]).mean(0)
    spread = np.asarray(morf["logit"]).std(0) / np.sqrt(64)
    assert np.all(np.abs(gap) <= 4 * spread + 1e-6)


def test_faithfulness_correlation_is_one_for_the_truth_and_small_for_noise(linear):
    f, x, target, exact = linear
    kw = dict(subset_size=40, bounds=BOUNDS)
    corr = metrics.faithfulness_correlation(f, x, target, exact, **kw)
    np.testing.assert_allclose(corr, 1.0, rtol=1e-9)
    noise = metrics.random_attribution(x, jax.random.key(2))
    assert abs(float(metrics.faithfulness_correlation(f, x, target, noise, **kw).mean())) < 0.3


def test_randomizing_the_only_layer_decorrelates_saliency():
    model = Linear()
    x = jax.random.normal(jax.random.key(1), (6, 16, 16, 1))
    params, fresh = (model.init(jax.random.key(k), x[:1])["params"] for k in (0, 7))
    target = jnp.array([0, 1, 2, 0, 1, 2])
    fn = lambda p, v, t: explain.saliency(f_of(model, p), v, t)  # noqa: E731
    out = metrics.randomization_cascade(
        functools.partial(apply, model), params, fresh, x, target, fn
    )
    assert out["layers"] == ["fc"]
    assert out["similarity"].shape == (1, 6) and out["attributions"].shape == (2, 6, 16, 16)
    assert abs(float(out["similarity"].mean())) < 0.25
    same = metrics.randomization_cascade(
        functools.partial(apply, model), params, fresh, x, target, lambda p, v, t: fn(params, v, t)
    )
    np.testing.assert_allclose(same["similarity"], 1.0)


def test_randomized_replaces_exactly_the_top_layers():
    model, x = LeNet5(), jnp.zeros((1, 32, 32, 1))
    params, fresh = (init_params(model, jax.random.key(k)) for k in (0, 7))
    layers = metrics.layers_top_down(functools.partial(apply, model), params, x)
    assert layers == ["fc3", "fc2", "fc1", "conv2", "conv1"]
    # forward order, not the parameters' alphabetical one
    vit, xv = ViT(), jnp.zeros((1, 28, 28, 1))
    vit_params = init_params(vit, jax.random.key(0))
    assert metrics.layers_top_down(functools.partial(apply, vit), vit_params, xv) == [
        "head", "ln", "block_1", "block_0", "pos", "cls", "embed"
    ]  # fmt: skip
    new = metrics.randomized(params, fresh, layers[:2])
    for name in ("fc3", "fc2"):
        np.testing.assert_array_equal(new[name]["kernel"], fresh[name]["kernel"])
    for name in ("fc1", "conv2", "conv1"):
        np.testing.assert_array_equal(new[name]["kernel"], params[name]["kernel"])
    with pytest.raises(ValueError, match=r"no parameters named \['fc9'\]; the model has"):
        metrics.randomized(params, fresh, ["fc9"])


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 50)), rng.normal(size=(3, 50))
    b[1] = a[1] ** 3  # monotone: exactly 1
    ours = np.asarray(metrics.spearman(jnp.asarray(a), jnp.asarray(b)))
    ref = [stats.spearmanr(a[i], b[i]).statistic for i in range(3)]
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert ours[1] == pytest.approx(1.0)


def test_sparseness_gini_known_values():
    n = 64
    uniform = jnp.ones((1, 8, 8))
    one_hot = jnp.zeros((1, 8, 8)).at[0, 3, 3].set(5.0)
    np.testing.assert_allclose(metrics.sparseness(uniform), 0.0, atol=1e-12)
    np.testing.assert_allclose(metrics.sparseness(one_hot), (n - 1) / n, rtol=1e-12)
    np.testing.assert_array_equal(metrics.sparseness(jnp.zeros((2, 8, 8))), 0.0)


def test_conservation_error_of_exact_relevance_is_zero(linear):
    _, x, target, _ = linear
    w = jax.random.normal(jax.random.key(3), (256, 3), jnp.float64)
    f = lambda v: v.reshape(v.shape[0], -1) @ w  # noqa: E731
    relevance = w[:, target].T.reshape(6, 16, 16, 1) * x
    np.testing.assert_allclose(metrics.conservation_error(f, x, target, relevance), 0, atol=1e-12)
    assert float(metrics.conservation_error(f, x, target, 2 * relevance).min()) == pytest.approx(1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"order": "best"}, r"unknown order 'best'; choose one of \['morf', 'lerf', 'random'\]"),
        ({"patch": 3}, r"patch size 3 must divide the image size 16x16"),
        ({"replacement": "blur"}, r"unknown replacement 'blur'"),
        (
            {"bounds": None},
            r"replacement 'black' needs bounds=\(low, high\), the model's input range",
        ),
    ],
)
def test_bad_flipping_arguments(kwargs, message, linear):
    f, x, target, exact = linear
    with pytest.raises(ValueError, match=message):
        metrics.pixel_flipping(f, x, target, exact, **{"bounds": BOUNDS, **kwargs})


@pytest.mark.parametrize("replacement", ["mean", "uniform", "array"])
def test_replacements_change_the_curve_but_not_step_zero(replacement, linear):
    f, x, target, exact = linear
    black = metrics.pixel_flipping(f, x, target, exact, n_steps=4, bounds=BOUNDS)
    fill = jnp.full(x.shape[1:], 0.5) if replacement == "array" else replacement
    other = metrics.pixel_flipping(f, x, target, exact, n_steps=4, replacement=fill, bounds=BOUNDS)
    np.testing.assert_array_equal(black["logit"][:, 0], other["logit"][:, 0])
    assert not np.allclose(black["logit"][:, -1], other["logit"][:, -1])
    if replacement == "array":  # all removed: the score of the baseline image
        np.testing.assert_allclose(other["logit"][:, -1], f(fill[None])[0, target], rtol=1e-9)
