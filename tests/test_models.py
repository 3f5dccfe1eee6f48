import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_jax import layers
from lenet_jax.layers import Conv, forward
from lenet_jax.models import (
    MODELS,
    LeNet5,
    build_model,
    count_params,
    describe,
    init_params,
    model_config,
)

LENET5_PARAMS = 61_706


def test_lenet5_has_the_faithful_parameter_count_and_names():
    params = init_params(LeNet5(), jax.random.key(0))
    assert count_params(params) == LENET5_PARAMS
    chex.assert_trees_all_equal_shapes(
        params,
        {
            "conv1": {"kernel": jnp.zeros((5, 5, 1, 6)), "bias": jnp.zeros(6)},
            "conv2": {"kernel": jnp.zeros((5, 5, 6, 16)), "bias": jnp.zeros(16)},
            "fc1": {"kernel": jnp.zeros((400, 120)), "bias": jnp.zeros(120)},
            "fc2": {"kernel": jnp.zeros((120, 84)), "bias": jnp.zeros(84)},
            "fc3": {"kernel": jnp.zeros((84, 10)), "bias": jnp.zeros(10)},
        },
    )
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32


def test_layer_sequence_is_discoverable_and_faithful():
    kinds = [(layer.name, layer.kind) for layer in LeNet5().layers]
    assert kinds == [
        ("conv1", "conv"),
        ("act1", "activation"),
        ("pool1", "avg_pool"),
        ("conv2", "conv"),
        ("act2", "activation"),
        ("pool2", "avg_pool"),
        ("flatten", "flatten"),
        ("fc1", "dense"),
        ("act3", "activation"),
        ("fc2", "dense"),
        ("act4", "activation"),
        ("fc3", "dense"),
    ]
    relu_max = LeNet5(activation="relu", pool="max").layers
    assert {layer.fn for layer in relu_max if layer.kind == "activation"} == {"relu"}
    assert [layer.kind for layer in relu_max].count("max_pool") == 2


@pytest.mark.parametrize("activation,pool", [("tanh", "avg"), ("relu", "max")])
def test_forward_walk_equals_module_apply(activation, pool):
    model = LeNet5(activation=activation, pool=pool)
    params = init_params(model, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (3, 32, 32, 1), jnp.float32)
    logits = model.apply({"params": params}, x)
    chex.assert_shape(logits, (3, 10))
    walked, inputs = forward(model.layers, params, x)
    np.testing.assert_array_equal(np.asarray(walked), np.asarray(logits))
    assert [a.shape[1:] for a in inputs[:4]] == [(32, 32, 1), (28, 28, 6), (28, 28, 6), (14, 14, 6)]


def _lax_conv(padding):
    return lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


# (input channels, width): one channel (shifted multiply-adds with banded or im2col derivatives),
# few channels on a narrow input (banded matmul), many channels (im2col).
CONV_CASES = [(1, 9), (1, 40), (3, 9), (12, 9)]


def _value_and_derivatives(fn, x, kernel, cotangent, tangents):
    """``fn(x, kernel)``, its vjp of ``cotangent`` and its jvp along ``tangents``, in one jit."""

    def run(x, kernel, cotangent, tangents):
        y, pullback = jax.vjp(fn, x, kernel)
        return y, pullback(cotangent), jax.jvp(fn, (x, kernel), tangents)[1]

    return jax.jit(run)(x, kernel, cotangent, tangents)


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
@pytest.mark.parametrize("kernel", [4, 5])
@pytest.mark.parametrize("channels,width", CONV_CASES)
def test_every_conv_form_matches_lax_in_float64(padding, kernel, channels, width):
    conv = Conv("c", 7, (kernel, kernel), padding)
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (2, 9, width, channels), jnp.float64)
    k = jax.random.normal(keys[1], (kernel, kernel, channels, 7), jnp.float64)
    bias = jax.random.normal(keys[2], (7,), jnp.float64)
    out_shape = (2, 9, width, 7) if padding == "SAME" else (2, 10 - kernel, width + 1 - kernel, 7)
    cotangent = jax.random.normal(keys[3], out_shape, jnp.float64)
    tangents = (jax.random.normal(keys[4], x.shape, jnp.float64), k * 0.5)
    got = _value_and_derivatives(
        lambda x, k: conv.apply({"kernel": k, "bias": bias}, x), x, k, cotangent, tangents
    )
    want = _value_and_derivatives(
        lambda x, k: _lax_conv(padding)(x, k) + bias.reshape(1, 1, 1, 7), x, k, cotangent, tangents
    )
    chex.assert_trees_all_close(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("banded", [True, False])
def test_one_channel_conv_derivatives_through_either_matmul_form(banded):
    keys = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(keys[0], (3, 12, 11, 1), jnp.float64)
    kernel = jax.random.normal(keys[1], (5, 4, 1, 6), jnp.float64)
    g = jax.random.normal(keys[2], (3, 8, 8, 6), jnp.float64)
    ours = functools.partial(layers._conv_shifted, banded=banded)
    np.testing.assert_allclose(ours(x, kernel), _lax_conv("VALID")(x, kernel), atol=1e-12)
    for got, want in zip(
        jax.vjp(ours, x, kernel)[1](g),
        jax.vjp(_lax_conv("VALID"), x, kernel)[1](g),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


def test_avg_pool_drops_the_remainder_like_reduce_window():
    x = jax.random.normal(jax.random.key(6), (2, 7, 9, 3), jnp.float64)
    pool = layers.AvgPool("p", 2)
    want = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    chex.assert_shape(pool.apply(None, x), (2, 3, 4, 3))
    np.testing.assert_allclose(pool.apply(None, x), want, rtol=1e-13)


def test_tanh_is_the_cpu_rational_in_float32_and_exact_otherwise():
    x = jnp.concatenate(
        [
            jnp.linspace(-12.0, 12.0, 200_001, dtype=jnp.float32),
            jnp.asarray([0.0, 1e-30, -3e-4, 5e-4, 7.9, -7.95, 1e4, -jnp.inf, jnp.inf], jnp.float32),
        ]
    )
    got = layers.tanh(x)
    want = np.tanh(np.asarray(x, np.float64))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=4e-7, atol=1e-37)
    assert float(jnp.max(jnp.abs(got))) <= 1.0
    np.testing.assert_array_equal(jnp.sign(got), jnp.sign(x))
    # Its derivative is 1 - tanh^2 of the value it returns (finite everywhere).
    slope = jax.vmap(jax.grad(layers.tanh))(x)
    np.testing.assert_array_equal(slope, 1 - got * got)
    x64 = jnp.linspace(-3.0, 3.0, 101, dtype=jnp.float64)
    np.testing.assert_array_equal(layers.tanh(x64), jnp.tanh(x64))


def test_conv_matches_lax_reference_in_float64():
    model = LeNet5()
    params = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64), init_params(model, jax.random.key(3))
    )
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 1), jnp.float64)
    conv = model.layers[0]
    ref = _lax_conv("VALID")(x, params["conv1"]["kernel"]) + params["conv1"]["bias"].reshape(
        1, 1, 1, 6
    )
    np.testing.assert_allclose(conv.apply(params["conv1"], x), ref, rtol=1e-12, atol=1e-12)


def test_model_config_round_trips_and_bad_options_are_rejected():
    model = LeNet5(activation="relu")
    config = model_config(model)
    assert config == {
        "name": "lenet5",
        "dataset": "mnist",
        "activation": "relu",
        "pool": "avg",
        "num_classes": 10,
    }
    assert build_model(config) == model
    assert describe(config) == (
        "lenet5(activation='relu', dataset='mnist', num_classes=10, pool='avg')"
    )
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        LeNet5(dataset="svhn")
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model({"name": "vgg"})
    with pytest.raises(ValueError, match="unknown pool"):
        LeNet5(pool="median")
    with pytest.raises(ValueError, match="unknown activation"):
        _ = LeNet5(activation="gelu").layers


@pytest.mark.parametrize(
    "name, dataset, count, input_shape",
    [
        ("lenet5", "mnist", 61_706, (32, 32, 1)),
        ("lenet5", "cifar10", 62_006, (32, 32, 3)),
        ("lenet5_relu", "fashion_mnist", 61_706, (32, 32, 1)),
        ("cnn", "mnist", 225_034, (28, 28, 1)),
        ("cnn", "cifar10", 315_722, (32, 32, 3)),
        ("minivgg", "cifar10", 2_355_338, (32, 32, 3)),
        ("minivgg", "mnist", 2_354_762, (32, 32, 1)),
    ],
)
def test_every_model_has_its_pinned_size_and_forward_equals_apply(
    name, dataset, count, input_shape
):
    model = build_model({"name": name, "dataset": dataset})
    assert model.input_shape == input_shape
    params = init_params(model, jax.random.key(0))
    assert count_params(params) == count
    assert sorted(params) == sorted(layer.name for layer in model.layers if layer.has_params)
    x = jax.random.normal(jax.random.key(1), (3, *input_shape))
    out, inputs = forward(model.layers, params, x)
    np.testing.assert_array_equal(out, model.apply({"params": params}, x))
    assert out.shape == (3, 10) and len(inputs) == len(model.layers)


def test_the_registry_defaults():
    assert sorted(MODELS) == ["cnn", "lenet5", "lenet5_relu", "minivgg"]
    relu = build_model({"name": "lenet5_relu"})
    assert (relu.activation, relu.pool, relu.dataset) == ("relu", "max", "mnist")
    assert [layer.kind for layer in relu.layers][:3] == ["conv", "activation", "max_pool"]
    assert build_model({"name": "minivgg"}).dataset == "cifar10"  # seed 004's data


def test_minivgg_dropout_needs_a_key_in_training_and_is_off_in_evaluation():
    model = build_model({"name": "minivgg"})
    params = init_params(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    evaluation = model.apply({"params": params}, x)
    np.testing.assert_array_equal(evaluation, forward(model.layers, params, x)[0])
    train = lambda k: model.apply({"params": params}, x, train=True, rngs={"dropout": k})  # noqa: E731
    a, b, c = train(jax.random.key(2)), train(jax.random.key(2)), train(jax.random.key(3))
    np.testing.assert_array_equal(a, b)  # the key fixes the mask
    assert not np.allclose(a, c) and not np.allclose(a, evaluation)
    with pytest.raises(Exception, match="dropout"):
        model.apply({"params": params}, x, train=True)  # no key: an error, not silent dropout
    rates = [layer.rate for layer in model.layers if layer.kind == "dropout"]
    assert rates == [0.35, 0.45, 0.5]
