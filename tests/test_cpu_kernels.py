"""The CPU lowering (``lenet_jax.cpu_kernels.conv_general_dilated`` and ``bind``): equal to ``lax``
in float64 for every configuration it covers, chosen by shape, switched off on request, and used by
every explanation method without changing a map."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lenet_jax import cpu_kernels, explain

pytestmark = pytest.mark.usefixtures("float64")

ROOT = Path(__file__).resolve().parent.parent
NHWC = ("NHWC", "HWIO", "NHWC")

# (input shape, kernel shape, conv options): what each case exercises
CASES = {
    "same, banded": ((2, 9, 11, 3), (3, 3, 3, 4), dict(padding="SAME")),
    "strides, asymmetric padding": ((2, 9, 11, 3), (3, 3, 3, 4),
                                    dict(window_strides=(2, 3), padding=((1, 2), (0, 1)))),
    "negative padding, stride": ((2, 9, 40, 3), (3, 3, 3, 4),
                                 dict(window_strides=(1, 2), padding=((1, -1), (2, 0)))),
    "kernel dilation": ((2, 9, 11, 3), (3, 2, 3, 4), dict(padding="VALID", rhs_dilation=(2, 2))),
    "input dilation": ((2, 9, 11, 3), (3, 2, 3, 4),
                       dict(padding=((2, 1), (1, 1)), lhs_dilation=(2, 1))),
    "groups": ((2, 9, 11, 6), (3, 3, 2, 6), dict(padding="SAME", feature_group_count=3)),
    "depthwise": ((2, 9, 11, 4), (3, 3, 1, 4), dict(padding="SAME", feature_group_count=4)),
    "NCHW": ((2, 3, 9, 11), (4, 3, 3, 3),
             dict(padding="SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))),
    "1-D": ((2, 20, 3), (5, 3, 4),
            dict(window_strides=(2,), padding="SAME", dimension_numbers=("NWC", "WIO", "NWC"))),
    "3-D": ((2, 5, 6, 7, 2), (2, 3, 3, 2, 3),
            dict(window_strides=(1, 2, 1), padding="SAME",
                 dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))),
    "value lax, derivatives matmul": ((2, 9, 11, 3), (3, 3, 3, 16), dict(padding="SAME")),
    "value matmul, derivatives lax": ((2, 9, 11, 16), (3, 3, 16, 4), dict(padding="SAME")),
    "wide input: im2col": ((2, 9, 200, 2), (3, 3, 2, 4), dict(padding="SAME")),
    "tiny input, many channels": ((2, 2, 2, 24), (3, 3, 24, 24), dict(padding="SAME")),
}  # fmt: skip


def _conv(fn, options):
    options = {"window_strides": None, "dimension_numbers": NHWC, **options}
    if options["window_strides"] is None:
        options["window_strides"] = (1,) * len(options["dimension_numbers"][0][2:])
    return lambda x, k: fn(x, k, **options)


@pytest.mark.parametrize("case", CASES)
def test_lowered_conv_equals_lax_in_value_and_derivatives(case):
    x_shape, k_shape, options = CASES[case]
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], x_shape, jnp.float64)
    k = jax.random.normal(keys[1], k_shape, jnp.float64)
    ours, ref = (
        _conv(cpu_kernels.conv_general_dilated, options),
        _conv(lax.conv_general_dilated, options),
    )
    y = ref(x, k)
    cotangent = jax.random.normal(keys[2], y.shape, jnp.float64)
    tangents = (jax.random.normal(keys[3], x.shape, jnp.float64), 0.5 * k)

    def everything(fn):
        value, pullback = jax.vjp(fn, x, k)
        return value, *pullback(cotangent), jax.jvp(fn, (x, k), tangents)[1]

    for got, want in zip(jax.jit(lambda: everything(ours))(), everything(ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * float(jnp.abs(want).max()))
    # the lowered form is what runs: no convolution left where both forms are matmuls
    if case in ("same, banded", "tiny input, many channels", "wide input: im2col"):
        assert "conv_general_dilated" not in str(jax.make_jaxpr(ours)(x, k))


def test_the_form_is_chosen_by_shape():
    def prims(x_shape, k_shape):
        x, k = jnp.ones(x_shape), jnp.ones(k_shape)
        conv = _conv(cpu_kernels.conv_general_dilated, {"padding": "SAME"})
        value = str(jax.make_jaxpr(conv)(x, k))
        y, pullback = jax.vjp(conv, x, k)
        derivatives = str(jax.make_jaxpr(pullback)(y))  # the backward pass alone
        return "conv_general_dilated" in value, "conv_general_dilated" in derivatives

    assert prims((2, 28, 28, 1), (5, 5, 1, 6)) == (False, False)  # LeNet's conv1: matmuls
    assert prims((2, 14, 14, 6), (5, 5, 6, 16)) == (True, False)  # conv2: derivatives only
    assert prims((2, 32, 32, 3), (3, 3, 3, 64)) == (True, True)  # a stem: lax's
    assert prims((2, 16, 16, 64), (3, 3, 64, 64)) == (True, True)  # wide: lax's
    assert prims((2, 2, 2, 64), (3, 3, 64, 64)) == (False, False)  # 4 pixels: matmuls


def test_bind_lowers_only_when_active_and_batch_groups_stay_with_lax():
    x, k = jnp.ones((2, 8, 8, 2)), jnp.ones((3, 3, 2, 4))
    params = jax.make_jaxpr(_conv(lax.conv_general_dilated, {"padding": "SAME"}))(x, k)
    eqn = params.jaxpr.eqns[0]

    def bound(x, k):
        return cpu_kernels.bind(eqn.primitive, (x, k), eqn.params)

    assert "conv_general_dilated" not in str(jax.make_jaxpr(bound)(x, k))
    with cpu_kernels.forms(False):  # read when a function is traced: a new function here
        assert not cpu_kernels.active()
        assert "conv_general_dilated" in str(jax.make_jaxpr(lambda *a: bound(*a))(x, k))
    grouped = _conv(cpu_kernels.conv_general_dilated, {"padding": "SAME", "batch_group_count": 2})
    jaxpr = str(jax.make_jaxpr(grouped)(jnp.ones((4, 8, 8, 2)), jnp.ones((3, 3, 2, 4))))
    assert "batch_group_count=2" in jaxpr


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(4, (3, 3), strides=(2, 2), name="conv1")(x))
        x = nn.relu(nn.Conv(3, (3, 3), padding="SAME", feature_group_count=1, name="conv2")(x))
        return nn.Dense(5, name="fc")(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("method", list(explain.METHODS))
def test_every_method_gives_the_same_map_with_and_without_the_forms(method):
    x = jax.random.normal(jax.random.key(1), (3, 10, 10, 2), jnp.float64)
    model = _Net()
    f = functools.partial(model.apply, model.init(jax.random.key(2), x))
    options = {"smoothgrad": {"n_samples": 4}, "integrated_gradients": {"n_steps": 4},
               "occlusion": {"window": 4, "stride": 3}}.get(method, {})  # fmt: skip
    run = jax.jit(lambda v: explain.attribute(method, f, v, **options))
    lowered = run(x)
    with cpu_kernels.forms(False):
        plain = jax.jit(lambda v: explain.attribute(method, f, v, **options))(x)
        jaxpr = str(jax.make_jaxpr(lambda v: explain.attribute(method, f, v, **options))(x))
    assert "conv_general_dilated" in jaxpr
    np.testing.assert_allclose(lowered, plain, rtol=1e-10, atol=1e-12 * float(jnp.abs(plain).max()))
    assert float(jnp.abs(plain).max()) > 0


def _python(code: str, **env) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**{k: v for k, v in os.environ.items() if k not in BASE}, **env},
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


BASE = ("XLA_FLAGS", cpu_kernels.ENV_SWITCH)  # the variables the flag tests set themselves
FLAG_SCRIPT = """
import json, os
from lenet_jax import cpu_kernels
import jax.numpy as jnp
first = cpu_kernels.configure_xla()
again = cpu_kernels.configure_xla()
flags = os.environ.get("XLA_FLAGS", "")
(jnp.ones(2) + 1).block_until_ready()  # the backend starts with the flag
late = cpu_kernels.configure_xla()
print(json.dumps({"first": first, "again": again, "flags": flags, "late": late,
                  "active": cpu_kernels.active()}))
"""


def test_the_xla_flag_is_set_before_jax_starts_and_never_after():
    out = _python(FLAG_SCRIPT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    assert out["first"] is True and out["again"] is False and out["late"] is False
    assert out["flags"].split() == [
        "--xla_force_host_platform_device_count=1",
        cpu_kernels.XLA_FLAG,
    ]
    assert out["active"] is True
    # the switch turns both off; a user's own choice of fusions is kept
    off = _python(FLAG_SCRIPT, **{cpu_kernels.ENV_SWITCH: "0"})
    assert off["first"] is False and cpu_kernels.XLA_FLAG not in off["flags"]
    assert off["active"] is False
    own = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    mine = _python(FLAG_SCRIPT, XLA_FLAGS=own)
    assert mine["first"] is False and mine["flags"] == own


def test_importing_the_library_changes_no_flag():
    code = "import json, os, lenet_jax.explain; print(json.dumps(os.environ.get('XLA_FLAGS')))"
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) is None
