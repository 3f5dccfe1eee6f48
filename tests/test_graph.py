"""The tracer: layer names from structured scopes, custom derivatives, and the primitive registry."""

import functools
import gc
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jcore

from lenet_jax.explain import grad_cam, lrp, lrp_nodes
from lenet_jax.explain import primitives as P
from lenet_jax.explain.graph import evaluate, trace
from lenet_jax.models import LeNet5, init_params


def _lenet():
    model = LeNet5()
    return functools.partial(model.apply, {"params": init_params(model, jax.random.key(0))})


LENET_NODES = {
    "conv1": "conv",
    "elementwise": "elementwise",
    "sum": "sum",
    "conv2": "conv",
    "elementwise:1": "elementwise",
    "sum:1": "sum",
    "structural": "structural",
    "fc1": "dense",
    "elementwise:2": "elementwise",
    "fc2": "dense",
    "elementwise:3": "elementwise",
    "fc3": "dense",
}


@pytest.mark.parametrize("named_call", [True, False])
def test_linen_names_do_not_depend_on_flax_profiling_flag(named_call):
    f, x = _lenet(), jnp.ones((2, 32, 32, 1))
    with nn.override_named_call(named_call):
        assert lrp_nodes(f, x) == LENET_NODES


class _VmappedDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(4, name="fc1")
        with jax.named_scope("mine"):
            y = jnp.tanh(jax.vmap(lambda row: dense(row))(x))
        y = jnp.einsum("bi,bj->bij", y, x).reshape(y.shape[0], -1)  # a product of two values
        return nn.Dense(3)(y)


def test_transforms_are_not_names_and_user_scopes_are():
    model = _VmappedDense()
    x = jnp.ones((2, 5))
    f = functools.partial(model.apply, model.init(jax.random.key(0), x))
    # fc1 is called under vmap: still "fc1" (not "fc1/vmap()"); einsum's scope (its spec) is no
    # name; an unnamed module is Dense_0
    assert lrp_nodes(f, x) == {
        "fc1": "dense",
        "mine/elementwise": "elementwise",
        "product": "product",
        "structural": "structural",
        "Dense_0": "dense",
    }


class _Mlp(nnx.Module):
    def __init__(self, rngs, seen):
        self.inner = nnx.Linear(5, 4, rngs=rngs)
        self.out = nnx.Linear(4, 3, rngs=rngs)
        self.seen = seen

    def __call__(self, x):
        self.seen.append(type(self).__dict__["__call__"])
        return self.out(jnp.tanh(self.inner(x)))


def test_nnx_paths_leave_the_users_class_untouched():
    seen = []
    model = _Mlp(nnx.Rngs(0), seen)
    assert lrp_nodes(model, jnp.ones((2, 5))) == {
        "inner": "dense",
        "elementwise": "elementwise",
        "out": "dense",
    }
    assert seen and all(call is _Mlp.__dict__["__call__"] for call in seen)


def test_nnx_names_under_a_profiler_and_a_python_hook():
    import cProfile
    import sys

    model = _Mlp(nnx.Rngs(0), [])
    expected = {"inner": "dense", "elementwise": "elementwise", "out": "dense"}
    with cProfile.Profile() as profiler:  # a C profiler: paused while tracing, enabled after
        assert lrp_nodes(model, jnp.ones((2, 5))) == expected
        assert sys.getprofile() is profiler
    calls = []

    def hook(frame, event, arg):
        calls.append(event)

    sys.setprofile(hook)
    try:
        assert lrp_nodes(model, jnp.ones((2, 5))) == expected
        assert sys.getprofile() is hook  # restored
    finally:
        sys.setprofile(None)
    assert "call" in calls  # the user's hook kept seeing calls while the model was traced


def test_two_threads_explain_two_nnx_models_at_once():
    models = [_Mlp(nnx.Rngs(seed), []) for seed in (0, 1)]
    x = jax.random.normal(jax.random.key(2), (3, 5))
    expected = [np.asarray(lrp(m, x, target=1)) for m in models]
    results, barrier = {}, threading.Barrier(2)

    def work(i):
        barrier.wait()
        for _ in range(3):
            results[i] = (lrp_nodes(models[i], x), np.asarray(lrp(models[i], x, target=1)))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert list(results[i][0]) == ["inner", "elementwise", "out"]
        np.testing.assert_array_equal(results[i][1], expected[i])
    assert not np.allclose(expected[0], expected[1])


def test_gradient_through_the_interpreter_keeps_custom_derivatives():
    def f(x):
        return jax.nn.relu(x) @ jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])

    x = jnp.array([[0.0, -1.0, 2.0]])  # relu at 0: jax's derivative is 0 there (max's is 1/2)
    graph = trace(f, x)
    inner = jax.jacobian(lambda v: evaluate(graph, v)[graph.output])(x)
    np.testing.assert_array_equal(inner, jax.jacobian(f)(x))
    assert float(inner[0, 0, 0, 0]) == 0.0


def test_the_outermost_custom_derivative_wins():
    @jax.custom_jvp
    def inner(x):
        return jnp.maximum(x, 0.0)

    inner.defjvp(lambda p, t: (inner(p[0]), 2.0 * t[0]))

    @jax.custom_jvp
    def outer(x):
        return inner(2.0 * x)  # the inner call ends with the outer one

    outer.defjvp(lambda p, t: (outer(p[0]), 3.0 * t[0]))

    def f(x):
        return outer(x) * 1.0

    x = jnp.array([[1.0, -1.0]])
    graph = trace(f, x)
    inner_grad = jax.grad(lambda v: evaluate(graph, v)[graph.output].sum())(x)
    np.testing.assert_array_equal(inner_grad, jax.grad(lambda v: f(v).sum())(x))
    np.testing.assert_array_equal(inner_grad, [[3.0, 3.0]])


class _ReluTies(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(2, (3, 3), padding="SAME", name="conv")(x)
        return nn.Dense(3, name="head")(jax.nn.relu(h).reshape(x.shape[0], -1))


def test_grad_cam_differentiates_the_model_at_ties():
    model = _ReluTies()
    x = jnp.zeros((1, 4, 4, 1))  # every activation is exactly 0: relu's tie
    variables = model.init(jax.random.key(0), x)
    variables = jax.tree_util.tree_map(jnp.ones_like, variables)
    variables["params"]["conv"]["bias"] = jnp.zeros(2)
    f = functools.partial(model.apply, variables)
    # jax.nn.relu's derivative at 0 is 0: the class score has no gradient, so the map is 0
    np.testing.assert_array_equal(grad_cam(f, x, target=0, layer="conv"), np.zeros((1, 4, 4)))


def _installed_primitives() -> set[str]:
    import jax.nn  # noqa: F401  (defines its primitives)
    import jax.numpy  # noqa: F401

    return {o.name for o in gc.get_objects() if isinstance(o, jcore.Primitive)}


def test_every_registered_primitive_exists_in_the_installed_jax():
    missing = P.registered() - _installed_primitives()
    assert not missing, f"names that are no primitive of jax {jax.__version__}: {sorted(missing)}"


def _dense(x):
    w = jnp.arange(12.0).reshape(4, 3) / 10 - 0.5
    return x @ w


def _swap(v):
    return jnp.concatenate([v[:, 2:], v[:, :2]], axis=1)


@pytest.mark.parametrize(
    "wrapped, plain",
    [
        (lambda x: jax.jit(lambda v: _dense(jnp.tanh(v)))(x), lambda x: _dense(jnp.tanh(x))),
        (lambda x: jax.checkpoint(lambda v: _dense(jnp.tanh(v)))(x), lambda x: _dense(jnp.tanh(x))),
        (
            lambda x: _dense(jnp.concatenate(jnp.split(jnp.tanh(x), 2, axis=1)[::-1], axis=1)),
            lambda x: _dense(_swap(jnp.tanh(x))),
        ),
    ],
    ids=["jit", "checkpoint", "split"],
)
def test_calls_and_split_are_traced_through(wrapped, plain):
    x = jnp.array([[0.5, -1.0, 2.0, 0.25]])
    relevance = lrp(wrapped, x, target=2, composite="epsilon")
    np.testing.assert_allclose(relevance, lrp(plain, x, target=2, composite="epsilon"), rtol=1e-6)
    # ε = 1e-6 and no biases: the relevance sums to the target logit
    np.testing.assert_allclose(relevance.sum(), plain(x)[0, 2], rtol=1e-4)
    assert not np.allclose(relevance, relevance[:, ::-1])
