"""Metrics of explanations on models whose true relevance is known, and their exact properties."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lenet_jax import evaluate, explain
from lenet_jax.data import normalized_range
from lenet_jax.models import ImageClassifier, LeNet5, ViT, explained, init_params

pytestmark = pytest.mark.usefixtures("float64")


class Linear(ImageClassifier):
    """logits = W·vec(x) + b on 16x16 inputs: the relevance of pixel i is w_i (x_i − black)."""

    @property
    def input_shape(self):
        return (16, 16, 1)

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(3, name="fc")(x.reshape((x.shape[0], -1)))


@pytest.fixture
def linear():
    model = Linear()
    params = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64), init_params(model, jax.random.key(0))
    )
    x = jax.random.normal(jax.random.key(1), (6, 16, 16, 1), jnp.float64)
    target = jnp.array([0, 1, 2, 0, 1, 2])
    w = params["fc"]["kernel"][:, target].T.reshape(6, 16, 16, 1)
    exact = w * (x - normalized_range()[0])
    return model, params, x, target, exact


def test_morf_curve_is_the_greedy_cumulative_sum_of_true_contributions(linear):
    model, params, x, target, exact = linear
    out = evaluate.pixel_flipping(model, params, x, target, exact, order="morf", n_steps=256)
    logits = model.apply({"params": params}, x)[jnp.arange(6), target]
    contributions = -np.sort(-np.asarray(exact).reshape(6, -1), axis=1)
    expected = np.asarray(logits)[:, None] - np.concatenate(
        [np.zeros((6, 1)), np.cumsum(contributions, axis=1)], axis=1
    )
    np.testing.assert_allclose(out["logit"], expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(out["aopc"], (out["prob"][:, :1] - out["prob"]).mean(1), rtol=1e-12)
    assert out["fraction"][0] == 0 and out["fraction"][-1] == 1


def test_the_exact_attribution_beats_random_on_morf_and_lerf(linear):
    model, params, x, target, exact = linear
    kw = dict(patch=2, n_steps=16)
    morf = evaluate.pixel_flipping(model, params, x, target, exact, order="morf", **kw)
    lerf = evaluate.pixel_flipping(model, params, x, target, exact, order="lerf", **kw)
    rand = evaluate.pixel_flipping(model, params, x, target, exact, order="random", **kw)
    assert np.all(np.asarray(morf["logit"]) <= np.asarray(rand["logit"]) + 1e-9)
    assert np.all(np.asarray(lerf["logit"]) >= np.asarray(rand["logit"]) - 1e-9)
    assert float(morf["aopc"].mean()) > float(rand["aopc"].mean()) > float(lerf["aopc"].mean())


def test_random_attribution_gives_morf_close_to_lerf():
    model = LeNet5()
    params = init_params(model, jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (64, 32, 32, 1))
    target = jnp.argmax(model.apply({"params": params}, x), 1)
    noise = evaluate.random_attribution(x, jax.random.key(9))
    morf = evaluate.pixel_flipping(
        model, params, x, target, noise, order="morf", patch=4, n_steps=8
    )
    lerf = evaluate.pixel_flipping(
        model, params, x, target, noise, order="lerf", patch=4, n_steps=8
    )
    gap = np.asarray(morf["logit"] - lerf["logit"]).mean(0)
    spread = np.asarray(morf["logit"]).std(0) / np.sqrt(64)
    assert np.all(np.abs(gap) <= 4 * spread + 1e-6)


def test_faithfulness_correlation_is_one_for_the_truth_and_small_for_noise(linear):
    model, params, x, target, exact = linear
    corr = evaluate.faithfulness_correlation(model, params, x, target, exact, subset_size=40)
    np.testing.assert_allclose(corr, 1.0, rtol=1e-9)
    noise = evaluate.random_attribution(x, jax.random.key(2))
    assert (
        abs(
            float(
                evaluate.faithfulness_correlation(
                    model, params, x, target, noise, subset_size=40
                ).mean()
            )
        )
        < 0.3
    )


def test_randomizing_the_only_layer_decorrelates_saliency(linear):
    model, params, x, target, _ = linear
    fn = lambda p, v, t: explain.saliency(explained(model, p), v, t)  # noqa: E731
    out = evaluate.randomization_cascade(model, params, x, target, fn)
    assert out["layers"] == ["fc"]
    assert out["similarity"].shape == (1, 6) and out["attributions"].shape == (2, 6, 16, 16)
    assert abs(float(out["similarity"].mean())) < 0.25
    same = evaluate.randomization_cascade(
        model, params, x, target, lambda p, v, t: fn(params, v, t)
    )
    np.testing.assert_allclose(same["similarity"], 1.0)


def test_randomized_params_replace_exactly_the_top_layers():
    model = LeNet5()
    params = init_params(model, jax.random.key(0))
    assert evaluate.param_layers_top_down(model) == ["fc3", "fc2", "fc1", "conv2", "conv1"]
    # forward order, not the parameters' alphabetical one
    assert evaluate.param_layers_top_down(ViT()) == [
        "head", "ln", "block_1", "block_0", "pos", "cls", "embed"
    ]  # fmt: skip
    new = evaluate.randomized_params(model, params, 2, jax.random.key(7))
    for name in ("fc3", "fc2"):
        assert not np.allclose(new[name]["kernel"], params[name]["kernel"])
    for name in ("fc1", "conv2", "conv1"):
        np.testing.assert_array_equal(new[name]["kernel"], params[name]["kernel"])


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 50)), rng.normal(size=(3, 50))
    b[1] = a[1] ** 3  # monotone: exactly 1
    ours = np.asarray(evaluate.spearman(jnp.asarray(a), jnp.asarray(b)))
    ref = [stats.spearmanr(a[i], b[i]).statistic for i in range(3)]
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert ours[1] == pytest.approx(1.0)


def test_sparseness_gini_known_values():
    n = 64
    uniform = jnp.ones((1, 8, 8))
    one_hot = jnp.zeros((1, 8, 8)).at[0, 3, 3].set(5.0)
    np.testing.assert_allclose(evaluate.sparseness(uniform), 0.0, atol=1e-12)
    np.testing.assert_allclose(evaluate.sparseness(one_hot), (n - 1) / n, rtol=1e-12)
    np.testing.assert_array_equal(evaluate.sparseness(jnp.zeros((2, 8, 8))), 0.0)


def test_conservation_error_of_exact_relevance_is_zero(linear):
    model, params, x, target, _ = linear
    zero_bias = {"fc": {"kernel": params["fc"]["kernel"], "bias": jnp.zeros(3)}}
    w = zero_bias["fc"]["kernel"][:, target].T.reshape(6, 16, 16, 1)
    np.testing.assert_allclose(
        evaluate.conservation_error(model, zero_bias, x, target, w * x), 0.0, atol=1e-12
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"order": "best"}, r"unknown order 'best'; choose one of \['morf', 'lerf', 'random'\]"),
        ({"patch": 3}, r"patch size 3 must divide the image size 16x16"),
        ({"replacement": "blur"}, r"unknown replacement 'blur'"),
    ],
)
def test_bad_flipping_arguments(kwargs, message, linear):
    model, params, x, target, exact = linear
    with pytest.raises(ValueError, match=message):
        evaluate.pixel_flipping(model, params, x, target, exact, **kwargs)


@pytest.mark.parametrize("replacement", ["mean", "uniform"])
def test_replacements_change_the_curve_but_not_step_zero(replacement, linear):
    model, params, x, target, exact = linear
    black = evaluate.pixel_flipping(model, params, x, target, exact, n_steps=4)
    other = evaluate.pixel_flipping(
        model, params, x, target, exact, n_steps=4, replacement=replacement
    )
    np.testing.assert_array_equal(black["logit"][:, 0], other["logit"][:, 0])
    assert not np.allclose(black["logit"][:, -1], other["logit"][:, -1])
