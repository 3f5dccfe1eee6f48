"""Cross-check of every built-in composite against zennit on a torch twin with the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, require
from twins import to_nchw, to_nhwc, torch_twin

from lenet_jax.data import DATASETS, normalized_range
from lenet_jax.explain import ZENNIT_COMPOSITES as OURS
from lenet_jax.explain import lrp
from lenet_jax.models import CNN, LeNet5, MiniVGG, dataset_options, explained

torch = require("torch")
require("zennit")
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import COMPOSITES as ZENNIT_COMPOSITES  # noqa: E402
from zennit.composites import LayerMapComposite, layer_map_base  # noqa: E402
from zennit.rules import Epsilon  # noqa: E402
from zennit.types import Convolution  # noqa: E402

pytestmark = pytest.mark.usefixtures("float64")


def zennit_composite(name, x_nchw):
    if name == "epsilon":  # zennit has no all-epsilon composite; this is its spelling of one
        return LayerMapComposite(
            layer_map=layer_map_base() + [(Convolution, Epsilon()), (torch.nn.Linear, Epsilon())]
        )
    if name == "epsilon_gamma_box":
        lo, hi = normalized_range()
        return ZENNIT_COMPOSITES[name](
            low=torch.full_like(x_nchw, lo), high=torch.full_like(x_nchw, hi)
        )
    return ZENNIT_COMPOSITES[name]()


def our_lrp(model, params, x, target, composite):
    dataset = "cifar10" if isinstance(model, MiniVGG) else "mnist"
    bounds = {k: v for k, v in dataset_options(dataset).items() if k in ("low", "high")}
    return np.asarray(lrp(explained(model, params), x, target, composite=composite, **bounds))


def zennit_lrp(model, params, x, target, composite):
    twin = torch_twin(model, params)
    xt = torch.tensor(to_nchw(x)).requires_grad_(True)
    logits = twin(xt).detach()
    seed = torch.nn.functional.one_hot(torch.tensor(np.asarray(target)), 10).to(logits) * logits
    with Gradient(model=twin, composite=zennit_composite(composite, xt)) as attributor:
        _, relevance = attributor(xt, seed)
    return to_nhwc(relevance.numpy())


@pytest.mark.peers
@pytest.mark.parametrize("composite", OURS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("variant", [("tanh", "avg"), ("relu", "max")])
def test_lrp_equals_zennit(composite, seed, variant):
    model = LeNet5(activation=variant[0], pool=variant[1])
    params = random_params(model, seed=seed)
    pixels = np.random.default_rng(seed).uniform(0, 1, (6, 32, 32, 1))
    x = jnp.asarray((pixels - 0.1307) / 0.3081)
    logits = model.apply({"params": params}, x)
    for target in (jnp.argmax(logits, 1), jnp.array([0, 1, 2, 3, 4, 9])):
        ours = our_lrp(model, params, x, target, composite)
        ref = zennit_lrp(model, params, np.asarray(x), target, composite)
        assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max(), composite
        assert np.abs(ref).max() > 0


@pytest.mark.peers
def test_twin_computes_the_same_logits():
    model = LeNet5()
    params = random_params(model)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 1), jnp.float64)
    twin = torch_twin(model, params)
    out = twin(torch.tensor(to_nchw(x))).detach().numpy()
    np.testing.assert_allclose(out, model.apply({"params": params}, x), rtol=1e-12, atol=1e-12)


def color_bounds(x_nchw):
    lo, hi = (
        torch.tensor(np.asarray(v, np.float64)).reshape(1, 3, 1, 1)
        for v in normalized_range("cifar10")
    )
    return lo.expand_as(x_nchw).clone(), hi.expand_as(x_nchw).clone()


@pytest.mark.peers
@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon"])
def test_lrp_on_minivgg_equals_zennit(composite):
    """MiniVGG: SAME-padded convs, max pooling, dropout, three channels."""
    model = MiniVGG()
    params = random_params(model, seed=3, bias_scale=0.01, dataset="cifar10")
    pixels = np.random.default_rng(3).uniform(0, 1, (2, 32, 32, 3))
    cifar = DATASETS["cifar10"]
    x = jnp.asarray((pixels - np.array(cifar.mean)) / np.array(cifar.std))
    target = jnp.array([3, 9])
    ours = our_lrp(model, params, x, target, composite)
    twin = torch_twin(model, params)
    xt = torch.tensor(to_nchw(np.asarray(x))).requires_grad_(True)
    logits = twin(xt).detach()
    seed = torch.nn.functional.one_hot(torch.tensor(np.asarray(target)), 10).to(logits) * logits
    if composite == "epsilon_gamma_box":
        low, high = color_bounds(xt)
        zc = ZENNIT_COMPOSITES[composite](low=low, high=high)
    else:
        zc = zennit_composite(composite, xt)
    with Gradient(model=twin, composite=zc) as attributor:
        _, relevance = attributor(xt, seed)
    ref = to_nhwc(relevance.numpy())
    assert np.abs(ref).max() > 0
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.peers
def test_lrp_on_the_small_relu_cnn_equals_zennit():
    model = CNN()
    params = random_params(model, seed=4, bias_scale=0.01)
    pixels = np.random.default_rng(4).uniform(0, 1, (5, 28, 28, 1))
    x = jnp.asarray((pixels - 0.1307) / 0.3081)
    target = jnp.argmax(model.apply({"params": params}, x), 1)
    ours = our_lrp(model, params, x, target, "epsilon_plus_flat")
    ref = zennit_lrp(model, params, np.asarray(x), target, "epsilon_plus_flat")
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()
