"""Grad-CAM and Score-CAM against independent implementations: captum's LayerGradCam and
pytorch-grad-cam's GradCAM and ScoreCAM, on a torch twin with the same weights (``peers`` extra)."""

import numpy as np
import pytest
from conftest import lenet_and_twin, normalized_pixels, require
from twins import to_nchw

from lenet_jax import explain
from lenet_jax.explain.cams import interpolation_matrix
from lenet_jax.models import explained

torch = require("torch")

pytestmark = [pytest.mark.peers, pytest.mark.usefixtures("float64")]


@pytest.fixture(params=[("tanh", "avg"), ("relu", "max")], ids=["tanh-avg", "relu-max"])
def case(request):
    model, params, twin = lenet_and_twin(*request.param, seed=5)
    x = normalized_pixels(4, seed=8)
    target = np.array([1, 4, 6, 9])
    return model, explained(model, params), x, target, twin, twin.conv2, torch.tensor(to_nchw(x))


@pytest.fixture
def raw_maps(monkeypatch):
    """pytorch-grad-cam with its final min-max scaling and resize switched off: the raw maps."""
    base_cam = require("pytorch_grad_cam.base_cam")
    monkeypatch.setattr(base_cam, "scale_cam_image", lambda cam, target_size=None: cam)
    return require("pytorch_grad_cam")


def assert_close(ours, theirs, rel):
    theirs = np.asarray(theirs)
    assert np.abs(np.asarray(ours) - theirs).max() <= rel * max(np.abs(theirs).max(), 1e-12)


@pytest.mark.parametrize("align_corners", [False, True])
def test_upsampling_equals_torch_interpolate(align_corners):
    maps = np.random.default_rng(0).normal(size=(3, 10, 7))
    ours = np.asarray(interpolation_matrix(10, 32, align_corners)) @ maps
    ours = ours @ np.asarray(interpolation_matrix(7, 28, align_corners)).T
    theirs = torch.nn.functional.interpolate(
        torch.tensor(maps)[:, None], size=(32, 28), mode="bilinear", align_corners=align_corners
    )[:, 0]
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-12, atol=1e-12)


def test_grad_cam_equals_captum_layer_grad_cam(case):
    captum_attr = require("captum.attr")
    model, f, x, t, twin, conv2, xt = case
    low = captum_attr.LayerGradCam(twin, conv2).attribute(
        xt, target=torch.tensor(t), relu_attributions=True
    )
    assert_close(explain.grad_cam(f, x, t, upsample=False), low[:, 0].detach(), 1e-9)
    up = captum_attr.LayerAttribution.interpolate(low, (32, 32), "bilinear")
    assert_close(explain.grad_cam(f, x, t), up[:, 0].detach(), 1e-9)


def test_grad_cam_equals_pytorch_grad_cam(case, raw_maps):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, f, x, t, twin, conv2, xt = case
    cam = raw_maps.GradCAM(model=twin, target_layers=[conv2])
    theirs = cam(input_tensor=xt, targets=[ClassifierOutputTarget(int(c)) for c in t])
    assert_close(explain.grad_cam(f, x, t, upsample=False), theirs, 1e-9)


def test_score_cam_equals_pytorch_grad_cam(case, raw_maps):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, f, x, t, twin, conv2, xt = case
    cam = raw_maps.ScoreCAM(model=twin, target_layers=[conv2])
    theirs = cam(input_tensor=xt, targets=[ClassifierOutputTarget(int(c)) for c in t])
    ours = explain.score_cam(f, x, t, upsample=False, align_corners=True)
    # pytorch-grad-cam collects the channel scores as float32 (torch.Tensor of Python floats)
    assert_close(ours, theirs, 1e-6)
    # half-pixel masks (the default) give a visibly different map
    default = explain.score_cam(f, x, t, upsample=False)
    assert np.abs(np.asarray(default) - theirs).max() > 1e-4 * np.abs(theirs).max()
