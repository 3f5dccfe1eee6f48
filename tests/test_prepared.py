"""``explain.prepare``: one program per model and input shape, equal to the method called directly."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lenet_jax import explain

pytestmark = pytest.mark.usefixtures("float64")


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
        return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def linen():
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 1), jnp.float64)
    model = Net()
    return functools.partial(model.apply, train=False), model.init(jax.random.key(1), x), x


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * float(np.abs(want).max()))


@pytest.mark.parametrize("method", ["lrp", "saliency", "grad_cam", "integrated_gradients"])
def test_an_explainer_equals_the_method_and_compiles_once_for_any_batch(linen, method):
    apply, variables, x = linen
    options = {"n_steps": 8} if method == "integrated_gradients" else {}
    explainer = explain.prepare(apply, x, method, **options)
    f = functools.partial(apply, variables)
    _close(explainer(variables, x), explain.attribute(method, f, x, **options))
    x7 = jnp.concatenate([x, 2 * x[:3]])  # 7 images: batches of 4, the last padded
    _close(explainer(variables, x7), explain.attribute(method, f, x7, **options))
    x2 = x[1:3]
    _close(explainer(variables, x2), explain.attribute(method, f, x2, **options))
    assert explainer._program._cache_size() == 1
    # given targets: one more program, the maps of those classes; -1 would be the predicted one
    target = jnp.asarray([2, 0, 1, 1])
    _close(explainer(variables, x, target), explain.attribute(method, f, x, target, **options))
    _close(explainer(variables, x, 1), explain.attribute(method, f, x, 1, **options))
    assert explainer._program._cache_size() == 2
    # new variables run the same program (they are its arguments, not constants in it)
    other = jax.tree_util.tree_map(lambda a: 1.5 * a, variables)
    g = functools.partial(apply, other)
    _close(explainer(other, x), explain.attribute(method, g, x, **options))
    assert explainer._program._cache_size() == 2


def test_an_nnx_model_is_prepared_with_its_state():
    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(12, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))

    model = Mlp(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (5, 2, 6), jnp.float32)
    explainer = explain.prepare(model, x, "gradient_x_input")
    _close(explainer(nnx.state(model), x), explain.gradient_x_input(model, x))


def test_bad_input_is_one_line(linen):
    apply, variables, x = linen
    explainer = explain.prepare(apply, x, "lrp")
    with pytest.raises(ValueError, match=r"prepared for inputs \[B, 6, 6, 1\] of float64"):
        explainer(variables, x[:, :5])
    with pytest.raises(ValueError, match="prepared for inputs"):
        explainer(variables, x.astype(jnp.float32))
    with pytest.raises(ValueError, match="NaN or inf values in 1 sample"):
        explainer(variables, x.at[2, 0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="target 3 out of range: the model has classes 0..2"):
        explainer(variables, x, jnp.asarray([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"target must be a scalar or have shape \[4\]"):
        explainer(variables, x, jnp.asarray([0, 1]))
    with pytest.raises(ValueError, match="lrp takes no option 'n_steps'"):
        explain.prepare(apply, x, "lrp", n_steps=3)
    with pytest.raises(ValueError, match="unknown method 'lpr'"):
        explain.prepare(apply, x, "lpr")
    with pytest.raises(ValueError, match="x_spec must be a float batch"):
        explain.prepare(apply, jnp.zeros((4, 6, 6, 1), jnp.int32), "lrp")


def test_an_explainer_composes_with_jit(linen):
    apply, variables, x = linen
    explainer = explain.prepare(apply, x, "saliency")
    traced = jax.jit(lambda v, a: explainer(v, a, 0))(variables, x)
    _close(traced, explain.saliency(functools.partial(apply, variables), x, 0))
