"""Cross-check of the gradient methods and occlusion against captum on a torch twin."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_nchw, lenet_and_twin, normalized_pixels, require
from twins import to_nchw

from lenet_jax import explain
from lenet_jax.data import normalized_range
from lenet_jax.models import explained

torch = require("torch")
captum_attr = require("captum.attr")

pytestmark = [pytest.mark.peers, pytest.mark.usefixtures("float64")]


@pytest.fixture(params=[("tanh", "avg"), ("relu", "max")], ids=["tanh-avg", "relu-max"])
def case(request):
    model, params, twin = lenet_and_twin(*request.param, seed=11)
    x = normalized_pixels(5, seed=3)
    target = jnp.array([0, 3, 5, 7, 9])
    return (
        model,
        explained(model, params),
        x,
        target,
        twin,
        torch.tensor(to_nchw(x)),
        torch.tensor(np.asarray(target)),
    )


close = assert_close_nchw


def test_saliency_and_gradient_x_input_equal_captum(case):
    model, f, x, t, twin, xt, tt = case
    close(explain.saliency(f, x, t), captum_attr.Saliency(twin).attribute(xt, target=tt))
    close(
        explain.saliency(f, x, t, absolute=False),
        captum_attr.Saliency(twin).attribute(xt, target=tt, abs=False),
    )
    close(
        explain.gradient_x_input(f, x, t),
        captum_attr.InputXGradient(twin).attribute(xt, target=tt),
    )


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left"])
def test_integrated_gradients_equal_captum(case, method):
    model, f, x, t, twin, xt, tt = case
    base = normalized_range()[0]  # black, the default of both
    base_t = base
    if model.activation == "relu" and method != "gausslegendre":
        # The Riemann rules take a gradient at the baseline itself. On a black image every max-pool
        # window ties in exact arithmetic; in floating point conv2's outputs there differ only by
        # rounding (~1e-16), so each library's rounding picks its own maximum: the gradient is not
        # defined there (seen: one VM's CPU agreed, another's differed by 2% of the largest value).
        # A non-constant baseline checks the same quadrature away from that point.
        base = normalized_pixels(5, seed=4)
        base_t = torch.tensor(to_nchw(base))
    ours = explain.integrated_gradients(f, x, t, n_steps=32, method=method, baseline=base)
    theirs = captum_attr.IntegratedGradients(twin).attribute(
        xt, baselines=base_t, target=tt, n_steps=32, method=method
    )
    if method == "riemann_trapezoid":
        # captum's trapezoid steps are 1/n with halved ends (they sum to (n-1)/n); ours are the
        # trapezoid rule's 1/(n-1), which sum to 1: the same points, weights scaled by n/(n-1).
        ours = ours * 31 / 32
    close(ours, theirs)


def test_occlusion_equals_captum(case):
    model, f, x, t, twin, xt, tt = case
    base = normalized_range()[0]
    ours = explain.occlusion(f, x, t, window=4, stride=2, baseline=base)
    theirs = captum_attr.Occlusion(twin).attribute(
        xt, sliding_window_shapes=(1, 4, 4), strides=(1, 2, 2), baselines=base, target=tt
    )
    close(ours, theirs)


@pytest.mark.parametrize(
    "variant, nt_type",
    [("smoothgrad", "smoothgrad"), ("squared", "smoothgrad_sq"), ("vargrad", "vargrad")],
)
def test_smoothgrad_equals_captum_noise_tunnel(case, variant, nt_type, monkeypatch):
    model, f, x, t, twin, xt, tt = case
    kw = dict(n_samples=6, noise_level=0.2, key=jax.random.key(5))
    noisy = explain.smoothgrad_noise(x, **kw)  # [B, n, H, W, C]
    # captum draws its own noise; hand it ours (its copies are image-major, as ours)
    flat = torch.tensor(to_nchw(noisy.reshape(-1, *x.shape[1:])))
    noise_tunnel = captum_attr.NoiseTunnel
    monkeypatch.setattr(
        noise_tunnel, "_add_noise_to_input", staticmethod(lambda inp, stdev, n: flat.clone())
    )
    theirs = noise_tunnel(captum_attr.Saliency(twin)).attribute(
        xt, nt_type=nt_type, nt_samples=6, stdevs=1.0, target=tt, abs=False
    )
    close(explain.smoothgrad(f, x, t, variant=variant, **kw), theirs)
