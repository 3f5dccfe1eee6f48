import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_jax import cpu_kernels
from lenet_jax.explain import layer_names
from lenet_jax.models import (
    MODELS,
    LeNet5,
    build_model,
    count_params,
    describe,
    init_params,
    model_config,
    model_input,
)
from lenet_jax.recipes import default_dataset

pytestmark = pytest.mark.usefixtures("float64")

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


@pytest.mark.parametrize("activation,pool", [("tanh", "avg"), ("relu", "max")])
def test_lenet5_is_the_1998_network_and_its_cpu_form_computes_the_same(activation, pool):
    model = LeNet5(activation=activation, pool=pool)
    params = init_params(model, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (3, 32, 32, 1), jnp.float32)
    logits = model.apply({"params": params}, x)
    chex.assert_shape(logits, (3, 10))
    fast = model.clone(cpu_kernels=True).apply({"params": params}, x)
    np.testing.assert_allclose(fast, logits, rtol=1e-5, atol=1e-5)
    assert layer_names(functools.partial(model.apply, {"params": params}), x) == [
        "conv1", "conv2", "fc1", "fc2", "fc3"
    ]  # fmt: skip
    # the reference form traces to lax's primitives, never the CPU forms
    jaxpr = str(jax.make_jaxpr(functools.partial(model.apply, {"params": params}))(x))
    assert jaxpr.count("conv_general_dilated") == 2
    want = "tanh" if activation == "tanh" else "max"
    assert want in jaxpr


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
def test_every_training_conv_form_matches_lax_in_float64(padding, kernel, channels, width):
    def conv(x, k):
        y = cpu_kernels.training_conv(x, k, (1, 1), padding, dimension_numbers=cpu_kernels._NHWC)
        return y + bias.reshape(1, 1, 1, 7)

    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (2, 9, width, channels), jnp.float64)
    k = jax.random.normal(keys[1], (kernel, kernel, channels, 7), jnp.float64)
    bias = jax.random.normal(keys[2], (7,), jnp.float64)
    out_shape = (2, 9, width, 7) if padding == "SAME" else (2, 10 - kernel, width + 1 - kernel, 7)
    cotangent = jax.random.normal(keys[3], out_shape, jnp.float64)
    tangents = (jax.random.normal(keys[4], x.shape, jnp.float64), k * 0.5)
    got = _value_and_derivatives(conv, x, k, cotangent, tangents)
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
    ours = functools.partial(cpu_kernels._conv_shifted, banded=banded)
    np.testing.assert_allclose(ours(x, kernel), _lax_conv("VALID")(x, kernel), atol=1e-12)
    for got, want in zip(
        jax.vjp(ours, x, kernel)[1](g),
        jax.vjp(_lax_conv("VALID"), x, kernel)[1](g),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


def test_avg_pool_drops_the_remainder_like_reduce_window():
    x = jax.random.normal(jax.random.key(6), (2, 7, 9, 3), jnp.float64)
    want = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    got = cpu_kernels.avg_pool(x, (2, 2), strides=(2, 2))
    chex.assert_shape(got, (2, 3, 4, 3))
    np.testing.assert_allclose(got, want, rtol=1e-13)
    # other windows are nn.avg_pool's own
    overlapping = cpu_kernels.avg_pool(x, (3, 3), strides=(1, 1))
    np.testing.assert_allclose(overlapping, nn.avg_pool(x, (3, 3), strides=(1, 1)), rtol=1e-13)


def test_tanh_is_the_rational_in_float32_and_exact_otherwise():
    x = jnp.concatenate(
        [
            jnp.linspace(-12.0, 12.0, 200_001, dtype=jnp.float32),
            jnp.asarray([0.0, 1e-30, -3e-4, 5e-4, 7.9, -7.95, 1e4, -jnp.inf, jnp.inf], jnp.float32),
        ]
    )
    got = cpu_kernels.tanh(x)
    want = np.tanh(np.asarray(x, np.float64))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=4e-7, atol=1e-37)
    assert float(jnp.max(jnp.abs(got))) <= 1.0
    np.testing.assert_array_equal(jnp.sign(got), jnp.sign(x))
    # Its derivative is 1 - tanh^2 of the value it returns (finite everywhere).
    slope = jax.vmap(jax.grad(cpu_kernels.tanh))(x)
    np.testing.assert_array_equal(slope, 1 - got * got)
    x64 = jnp.linspace(-3.0, 3.0, 101, dtype=jnp.float64)
    np.testing.assert_array_equal(cpu_kernels.tanh(x64), jnp.tanh(x64))


def test_a_strided_conv_trains_with_lax():
    x = jax.random.normal(jax.random.key(4), (2, 9, 9, 2), jnp.float64)
    k = jax.random.normal(jax.random.key(5), (3, 3, 2, 4), jnp.float64)
    args = ((2, 2), "VALID")
    got = cpu_kernels.training_conv(x, k, *args, dimension_numbers=cpu_kernels._NHWC)
    want = jax.lax.conv_general_dilated(x, k, *args, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_array_equal(got, want)


def test_model_config_round_trips_and_bad_options_are_rejected():
    model = LeNet5(activation="relu")
    config = model_config(model)
    # a model is only a model: the dataset belongs to the run
    assert config == {"name": "lenet5", "activation": "relu", "pool": "avg", "num_classes": 10}
    assert build_model(config) == model
    assert describe(config) == "lenet5(activation='relu', num_classes=10, pool='avg')"
    # checkpoints written before the dataset moved to the run name it in the model's config
    assert build_model({**config, "dataset": "mnist"}) == model
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        model_input(model, "svhn")
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model({"name": "vgg"})
    with pytest.raises(ValueError, match="unknown pool"):
        LeNet5(pool="median")
    with pytest.raises(ValueError, match="unknown activation"):
        LeNet5(activation="gelu")
    assert model_config(model.clone(cpu_kernels=True)) == config


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
def test_every_model_has_its_pinned_size_and_its_cpu_form_equals_it(
    name, dataset, count, input_shape
):
    model = build_model({"name": name})
    assert model_input(model, dataset).shape == input_shape
    params = init_params(model, jax.random.key(0), dataset)
    assert count_params(params) == count
    x = jax.random.normal(jax.random.key(1), (3, *input_shape))
    f = functools.partial(model.apply, {"params": params})
    assert layer_names(f, x) == list(params)  # every parametrized layer, in forward order
    out = f(x)
    fast = model.clone(cpu_kernels=True).apply({"params": params}, x)
    np.testing.assert_allclose(fast, out, rtol=2e-5, atol=2e-5)
    assert out.shape == (3, 10)


def test_the_registry_defaults():
    assert sorted(MODELS) == ["cnn", "lenet5", "lenet5_relu", "minivgg", "vit"]
    relu = build_model({"name": "lenet5_relu"})
    assert (relu.activation, relu.pool) == ("relu", "max")
    assert (default_dataset("minivgg"), default_dataset("lenet5")) == ("cifar10", "mnist")


def test_minivgg_dropout_needs_a_key_in_training_and_is_off_in_evaluation():
    model = build_model({"name": "minivgg"})
    params = init_params(model, jax.random.key(0), "cifar10")
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    evaluation = model.apply({"params": params}, x)
    np.testing.assert_array_equal(evaluation, model.apply({"params": params}, x, train=False))
    train = lambda k: model.apply({"params": params}, x, train=True, rngs={"dropout": k})  # noqa: E731
    a, b, c = train(jax.random.key(2)), train(jax.random.key(2)), train(jax.random.key(3))
    np.testing.assert_array_equal(a, b)  # the key fixes the mask
    assert not np.allclose(a, c) and not np.allclose(a, evaluation)
    with pytest.raises(Exception, match="dropout"):
        model.apply({"params": params}, x, train=True)  # no key: an error, not silent dropout
    # the Dropout modules by name, each with its rate
    tabulated = model.tabulate(jax.random.key(0), x, train=False, depth=1)
    assert all(f"drop{i}" in tabulated for i in (1, 2, 3))
