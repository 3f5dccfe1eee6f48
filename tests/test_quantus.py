"""Cross-check of the pixel-flipping curve against Quantus' PixelFlipping on the torch twin."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, require
from twins import to_nchw, torch_twin

from lenet_jax.data import normalized_range
from lenet_jax.explain import metrics
from lenet_jax.models import LeNet5, explained

torch = require("torch")
require("torchvision")  # before TensorFlow (see below)

pytestmark = [pytest.mark.peers, pytest.mark.usefixtures("float64")]


@pytest.mark.parametrize("softmax", [True, False])
def test_pixel_flipping_curve_equals_quantus(softmax):
    # imported here, not at collection: quantus imports TensorFlow when it is installed, and
    # TensorFlow loaded before torchvision's import of triton makes that import crash
    quantus = require("quantus")
    model = LeNet5()
    params = random_params(model, seed=21, dtype=jnp.float32)
    pixels = np.random.default_rng(5).uniform(0, 1, (4, 32, 32, 1)).astype(np.float32)
    pixels[:, :2] = 0.0  # a black border, as MNIST's padding: Quantus' "black" is the image minimum
    x = jnp.asarray((pixels - 0.1307) / 0.3081, jnp.float32)
    target = jnp.array([1, 4, 7, 9])
    attribution = jax.random.normal(jax.random.key(0), x.shape, jnp.float32)
    ours = metrics.pixel_flipping(
        explained(model, params),
        x,
        target,
        attribution,
        order="morf",
        patch=1,
        n_steps=16,
        bounds=normalized_range("mnist"),
    )  # 64 pixels per step
    metric = quantus.PixelFlipping(
        features_in_step=64,
        perturb_baseline="black",
        disable_warnings=True,
        display_progressbar=False,
    )
    twin = torch_twin(model, params, dtype="float32")
    theirs = metric(
        model=twin,
        x_batch=to_nchw(x),
        y_batch=np.asarray(target),
        a_batch=to_nchw(attribution),
        device="cpu",
        softmax=softmax,
        channel_first=True,
    )
    curve = np.asarray(ours["prob"] if softmax else ours["logit"])[:, 1:]
    np.testing.assert_allclose(curve, np.asarray(theirs), rtol=2e-4, atol=2e-5)
