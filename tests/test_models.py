import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_jax.layers import forward
from lenet_jax.models import LeNet5, build_model, count_params, describe, init_params, model_config

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


def test_conv_matches_lax_reference_in_float64():
    model = LeNet5()
    params = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64), init_params(model, jax.random.key(3))
    )
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 1), jnp.float64)
    conv = model.layers[0]
    ref = jax.lax.conv_general_dilated(
        x, params["conv1"]["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    ) + params["conv1"]["bias"].reshape(1, 1, 1, 6)
    np.testing.assert_allclose(conv.apply(params["conv1"], x), ref, rtol=1e-12, atol=1e-12)


def test_model_config_round_trips_and_bad_options_are_rejected():
    model = LeNet5(activation="relu")
    config = model_config(model)
    assert config == {"name": "lenet5", "activation": "relu", "pool": "avg", "num_classes": 10}
    assert build_model(config) == model
    assert describe(config) == "lenet5(activation='relu', num_classes=10, pool='avg')"
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model({"name": "vgg"})
    with pytest.raises(ValueError, match="unknown pool"):
        LeNet5(pool="median")
    with pytest.raises(ValueError, match="unknown activation"):
        _ = LeNet5(activation="gelu").layers
