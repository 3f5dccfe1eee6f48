"""Models a user would write, explained and cross-checked against zennit, captum and pytorch-grad-cam.

Four models none of the package's code knows: a Linen VGG-style CNN with BatchNorm and max pooling,
an NNX CNN in the style of flax's ``examples/mnist`` (nnx.Conv -> nnx.BatchNorm -> nnx.relu ->
avg_pool ... nnx.Linear), a Linen residual block followed by pooling, a mean and a dense head, and a
plain-JAX MLP. Each has a PyTorch twin with the same weights. zennit 0.5.1 keeps a BatchNorm's eps
after merging it into the layer before, dividing by sqrt(1 + eps) once too often, so the twins'
BatchNorms have eps = 0 with the running variance shifted by the Flax eps instead: the same function.
"""

import functools
import importlib.metadata

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_nchw, require
from flax import nnx
from twins import to_nchw, to_nhwc

from lenet_jax import explain

torch = require("torch")
require("zennit")
from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import COMPOSITES as ZENNIT_COMPOSITES  # noqa: E402
from zennit.composites import LayerMapComposite, layer_map_base  # noqa: E402
from zennit.layer import Sum  # noqa: E402
from zennit.rules import Epsilon  # noqa: E402
from zennit.types import Convolution  # noqa: E402

pytestmark = [pytest.mark.peers, pytest.mark.usefixtures("float64")]
LOW, HIGH = -0.5, 2.5  # the zB bounds of these tests' inputs
BN_EPS = 1e-3


# --------------------------------------------------------------------------- the user's models


class VGGBN(nn.Module):
    """Linen: two conv -> BatchNorm -> relu -> max-pool blocks, two dense layers."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, features in enumerate((6, 8)):
            x = nn.Conv(features, (3, 3), padding="SAME", name=f"conv{i + 1}")(x)
            x = nn.BatchNorm(use_running_average=not train, epsilon=BN_EPS, name=f"bn{i + 1}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(16, name="fc1")(x))
        return nn.Dense(10, name="fc2")(x)


class NNXCNN(nnx.Module):
    """NNX, as flax's examples/mnist: conv -> BatchNorm -> relu -> avg-pool, twice, two linears."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 6, kernel_size=(3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(6, epsilon=BN_EPS, rngs=rngs)
        self.conv2 = nnx.Conv(6, 8, kernel_size=(3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, epsilon=BN_EPS, rngs=rngs)
        self.linear1 = nnx.Linear(4 * 4 * 8, 16, rngs=rngs)
        self.linear2 = nnx.Linear(16, 10, rngs=rngs)
        self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.bn1(self.conv1(x))))
        x = self.avg_pool(nnx.relu(self.bn2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)
        return self.linear2(nnx.relu(self.linear1(x)))


class ResBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(self.features, (3, 3), padding="SAME", name="conv_a")(x))
        h = nn.Conv(self.features, (3, 3), padding="SAME", name="conv_b")(h)
        return nn.relu(h + x)


class ResNet(nn.Module):
    """Linen: a stem, one residual block, average pooling, a global mean, a dense head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="stem")(x))
        x = ResBlock(6, name="block1")(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


def mlp_params(key):
    sizes = [(256, 24), (24, 16), (16, 10)]
    keys = jax.random.split(key, 2 * len(sizes))
    return [
        (
            jax.random.normal(keys[2 * i], s, jnp.float64) / np.sqrt(s[0]),
            0.1 * jax.random.normal(keys[2 * i + 1], s[1:], jnp.float64),
        )
        for i, s in enumerate(sizes)
    ]


def mlp(params, x):
    """A plain JAX function: flatten, tanh and relu hidden layers."""
    (w1, b1), (w2, b2), (w3, b3) = params
    h = x.reshape(x.shape[0], -1)
    h = jnp.tanh(h @ w1 + b1[None])
    h = jax.nn.relu(h @ w2 + b2[None])
    return h @ w3 + b3[None]


# --------------------------------------------------------------------------- weights and twins


def randomize(tree, key, scale=0.3):
    """Every leaf replaced by random float64 values (variances positive)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, leaf), k in zip(leaves, keys, strict=True):
        name = jax.tree_util.keystr(path)
        v = jax.random.normal(k, leaf.shape, jnp.float64)
        if "var" in name:
            v = 0.5 + jnp.abs(v)
        elif "scale" in name:
            v = 1.0 + 0.3 * v
        elif "kernel" in name:
            v = v / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            v = scale * v
        out.append(v)
    return jax.tree_util.tree_unflatten(treedef, out)


def t(a):
    return torch.tensor(np.asarray(a, np.float64))


def t_conv(p):
    k = np.asarray(p["kernel"])
    m = torch.nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], padding="same")
    m.weight.data, m.bias.data = t(k.transpose(3, 2, 0, 1)), t(p["bias"])
    return m


def t_dense(p, hwc=None):
    k = np.asarray(p["kernel"])
    if hwc is not None:
        h, w, c = hwc
        k = k.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
    m = torch.nn.Linear(*k.shape)
    m.weight.data, m.bias.data = t(k.T), t(p["bias"])
    return m


def t_bn(scale, bias, mean, var, keep_eps=False):
    """A BatchNorm twin: eps = 0 with the variance shifted by Flax's eps (what zennit 0.5.1 merges
    exactly), or, with ``keep_eps``, PyTorch's own form with the eps (zennit 1.0 merges it)."""
    m = torch.nn.BatchNorm2d(len(mean), eps=BN_EPS if keep_eps else 0.0)
    m.weight.data, m.bias.data = t(scale), t(bias)
    m.running_mean.data = t(mean)
    m.running_var.data = t(np.asarray(var) + (0.0 if keep_eps else BN_EPS))
    return m


def vgg_case(keep_eps=False):
    model = VGGBN()
    variables = randomize(
        model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1))), jax.random.key(1)
    )
    p, s = variables["params"], variables["batch_stats"]
    twin = torch.nn.Sequential()
    for i in (1, 2):
        bn = t_bn(
            p[f"bn{i}"]["scale"],
            p[f"bn{i}"]["bias"],
            s[f"bn{i}"]["mean"],
            s[f"bn{i}"]["var"],
            keep_eps,
        )
        twin.extend([t_conv(p[f"conv{i}"]), bn, torch.nn.ReLU(), torch.nn.MaxPool2d(2)])
    twin.extend([torch.nn.Flatten(), t_dense(p["fc1"], (4, 4, 8)), torch.nn.ReLU()])
    twin.append(t_dense(p["fc2"]))
    return functools.partial(model.apply, variables), twin


def nnx_case():
    model = NNXCNN(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, randomize(state, jax.random.key(2)))
    model.eval()

    def sub(m):
        return {k: np.asarray(v.value) for k, v in vars(m).items() if isinstance(v, nnx.Variable)}

    convs = [sub(model.conv1), sub(model.conv2)]
    bns = [sub(model.bn1), sub(model.bn2)]
    twin = torch.nn.Sequential()
    for conv, bn in zip(convs, bns, strict=True):
        twin.extend([t_conv(conv), t_bn(bn["scale"], bn["bias"], bn["mean"], bn["var"])])
        twin.extend([torch.nn.ReLU(), torch.nn.AvgPool2d(2)])
    twin.extend([torch.nn.Flatten(), t_dense(sub(model.linear1), (4, 4, 8)), torch.nn.ReLU()])
    twin.append(t_dense(sub(model.linear2)))
    return model, twin


class TorchResNet(torch.nn.Module):
    """The residual twin: the sum goes through zennit's ``Sum`` layer (its Norm rule)."""

    def __init__(self, p):
        super().__init__()
        self.stem, self.stem_act = t_conv(p["stem"]), torch.nn.ReLU()
        self.conv_a, self.act_a = t_conv(p["block1"]["conv_a"]), torch.nn.ReLU()
        self.conv_b, self.sum, self.act_b = t_conv(p["block1"]["conv_b"]), Sum(), torch.nn.ReLU()
        self.pool, self.mean = torch.nn.AvgPool2d(2), torch.nn.AdaptiveAvgPool2d(1)
        self.flatten, self.head = torch.nn.Flatten(), t_dense(p["head"])

    def forward(self, x):
        x = self.stem_act(self.stem(x))
        h = self.conv_b(self.act_a(self.conv_a(x)))
        x = self.act_b(self.sum(torch.stack([h, x], dim=-1)))
        return self.head(self.flatten(self.mean(self.pool(x))))


def res_case():
    model = ResNet()
    variables = randomize(
        model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1))), jax.random.key(3)
    )
    return functools.partial(model.apply, variables), TorchResNet(variables["params"])


def mlp_case():
    params = mlp_params(jax.random.key(4))
    twin = torch.nn.Sequential(torch.nn.Flatten())
    for i, (w, b) in enumerate(params):
        dense = torch.nn.Linear(*w.shape)
        dense.weight.data, dense.bias.data = t(np.asarray(w).T), t(b)
        twin.append(dense)
        twin.append([torch.nn.Tanh(), torch.nn.ReLU(), torch.nn.Identity()][i])
    return functools.partial(mlp, params), twin


CASES = {
    "linen_vgg_bn": vgg_case,
    "nnx_cnn": nnx_case,
    "linen_resnet": res_case,
    "jax_mlp": mlp_case,
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    with jax.enable_x64(True):
        f, twin = CASES[request.param]()
    x = jax.random.uniform(jax.random.key(7), (4, 16, 16, 1), jnp.float64, LOW, HIGH)
    return request.param, f, twin.double().eval(), x


def zennit_lrp(twin, x, target, composite):
    xt = torch.tensor(to_nchw(x)).requires_grad_(True)
    canon = [SequentialMergeBatchNorm()]
    if composite == "epsilon":  # zennit has no all-epsilon composite; this is its spelling of one
        layer_map = layer_map_base() + [(Convolution, Epsilon()), (torch.nn.Linear, Epsilon())]
        zc = LayerMapComposite(layer_map=layer_map, canonizers=canon)
    elif composite == "epsilon_gamma_box":
        low, high = torch.full_like(xt, LOW), torch.full_like(xt, HIGH)
        zc = ZENNIT_COMPOSITES[composite](low=low, high=high, canonizers=canon)
    else:
        zc = ZENNIT_COMPOSITES[composite](canonizers=canon)
    logits = twin(xt).detach()
    seed = torch.nn.functional.one_hot(torch.tensor(np.asarray(target)), 10).to(logits) * logits
    with Gradient(model=twin, composite=zc) as attributor:
        _, relevance = attributor(xt, seed)
    return to_nhwc(relevance.numpy())


# --------------------------------------------------------------------------- the checks


def test_twins_compute_the_same_logits(case):
    _, f, twin, x = case
    out = twin(torch.tensor(to_nchw(x))).detach().numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, f(x), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("composite", explain.ZENNIT_COMPOSITES)
def test_every_composite_equals_zennit(case, composite):
    _, f, twin, x = case
    target = jnp.array([0, 3, 5, 9])  # not the predicted classes
    ours = np.asarray(explain.lrp(f, x, target, composite=composite, low=LOW, high=HIGH))
    ref = zennit_lrp(twin, np.asarray(x), target, composite)
    assert np.abs(ref).max() > 0
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


ZENNIT_1 = int(importlib.metadata.version("zennit").split(".")[0]) >= 1


@pytest.mark.skipif(
    not ZENNIT_1,
    reason="zennit < 1.0 keeps a merged BatchNorm's eps (the twins above work round it)",
)
@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
def test_batchnorm_with_its_eps_equals_zennit_1(composite):
    # zennit 1.0 merges a BatchNorm with its eps exactly: the plain twin, eps and all
    with jax.enable_x64(True):
        f, twin = vgg_case(keep_eps=True)
        x = jax.random.uniform(jax.random.key(7), (4, 16, 16, 1), jnp.float64, LOW, HIGH)
        target = jnp.array([0, 3, 5, 9])
        ours = np.asarray(explain.lrp(f, x, target, composite=composite, low=LOW, high=HIGH))
    ref = zennit_lrp(twin.double().eval(), np.asarray(x), target, composite)
    assert np.abs(ref).max() > 0
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def test_layer_names_are_the_users(case):
    name, f, _, x = case
    expected = {
        "linen_vgg_bn": ["conv1", "conv2", "fc1", "fc2"],
        "nnx_cnn": ["conv1", "conv2", "linear1", "linear2"],
        "linen_resnet": ["stem", "block1/conv_a", "block1/conv_b", "head"],
        "jax_mlp": ["dense_0", "dense_1", "dense_2"],
    }[name]
    assert explain.layer_names(f, x) == expected
    rel = explain.lrp_layerwise(f, x, 2, composite="epsilon", epsilon=0.0)
    assert set(expected) <= set(rel)
    # the output layer's relevance is the seed, one_hot(target) * logit
    np.testing.assert_allclose(rel[expected[-1]][:, 2], f(x)[:, 2], rtol=1e-12)
    if name == "linen_resnet":
        assert {"block1", "block1/conv_a"} <= set(rel)
        assert rel["block1"].shape == (4, 16, 16, 6)


def test_a_user_composite_names_layers(case):
    _, f, _, x = case
    names = explain.layer_names(f, x)
    mapping = {name: "epsilon" for name in names}
    np.testing.assert_allclose(
        explain.lrp(f, x, 1, composite=mapping),
        explain.lrp(f, x, 1, composite="epsilon"),
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match=r"composite gives no rule for the layers \['"):
        explain.lrp(f, x, 1, composite={names[0]: "epsilon"})


def test_jit_vmap_and_batching_agree(case):
    _, f, _, x = case
    target = jnp.array([1, 2, 3, 4])
    eager = explain.lrp(f, x, target)
    jitted = jax.jit(lambda v: explain.lrp(f, v, target))(x)
    per_sample = jax.vmap(lambda v, c: explain.lrp(f, v[None], c)[0])(x, target)
    chunked = explain.lrp(f, x, target, batch_size=3)
    for other in (jitted, per_sample, chunked):
        np.testing.assert_allclose(other, eager, rtol=1e-9, atol=1e-12 * np.abs(eager).max())


# --------------------------------------------------------------- captum and pytorch-grad-cam


@pytest.fixture(scope="module")
def nnx_peer():
    with jax.enable_x64(True):
        model, twin = nnx_case()
    x = jax.random.uniform(jax.random.key(8), (3, 16, 16, 1), jnp.float64, LOW, HIGH)
    return model, twin.double().eval(), x, jnp.array([2, 5, 7])


close = assert_close_nchw


def test_gradient_methods_on_an_nnx_model_equal_captum(nnx_peer, monkeypatch):
    captum_attr = require("captum.attr")
    f, twin, x, target = nnx_peer
    xt, tt = torch.tensor(to_nchw(x)), torch.tensor(np.asarray(target))
    # jitted: one compile per method (eager, an NNX model compiles op by op)
    saliency = jax.jit(lambda v: explain.saliency(f, v, target))
    close(saliency(x), captum_attr.Saliency(twin).attribute(xt, target=tt))
    close(
        jax.jit(lambda v: explain.gradient_x_input(f, v, target))(x),
        captum_attr.InputXGradient(twin).attribute(xt, target=tt),
    )
    ig = jax.jit(
        lambda v: explain.integrated_gradients(f, v, target, n_steps=16, method="gausslegendre")
    )
    ours = ig(x)
    theirs = captum_attr.IntegratedGradients(twin).attribute(
        xt, target=tt, n_steps=16, method="gausslegendre"
    )  # both default to a zero baseline
    close(ours, theirs)
    kw = dict(n_samples=4, noise_level=0.2, key=jax.random.key(5))
    noisy = explain.smoothgrad_noise(x, **kw)
    flat = torch.tensor(to_nchw(noisy.reshape(-1, *x.shape[1:])))
    tunnel = captum_attr.NoiseTunnel
    monkeypatch.setattr(tunnel, "_add_noise_to_input", staticmethod(lambda i, s, n: flat.clone()))
    theirs = tunnel(captum_attr.Saliency(twin)).attribute(
        xt, nt_type="smoothgrad", nt_samples=4, stdevs=1.0, target=tt, abs=False
    )
    close(jax.jit(lambda v: explain.smoothgrad(f, v, target, **kw))(x), theirs)


def test_cams_on_an_nnx_model_equal_pytorch_grad_cam(nnx_peer, monkeypatch):
    base_cam = require("pytorch_grad_cam.base_cam")
    monkeypatch.setattr(base_cam, "scale_cam_image", lambda cam, target_size=None: cam)
    cams = require("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    f, twin, x, target = nnx_peer
    xt = torch.tensor(to_nchw(x))
    targets = [ClassifierOutputTarget(int(c)) for c in target]
    conv2 = twin[4]  # the second nnx.Conv's twin, before its BatchNorm
    theirs = cams.GradCAM(model=twin, target_layers=[conv2])(input_tensor=xt, targets=targets)
    ours = explain.grad_cam(f, x, target, layer="conv2", upsample=False)
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-9 * np.abs(theirs).max()
    theirs = cams.ScoreCAM(model=twin, target_layers=[conv2])(input_tensor=xt, targets=targets)
    ours = explain.score_cam(f, x, target, upsample=False, align_corners=True)  # default: conv2
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-6 * np.abs(theirs).max()
