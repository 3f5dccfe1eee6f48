"""Faster XLA:CPU forms of convolution, chosen by shape, and the XLA flag that helps wide ones.

XLA's CPU backend runs ``lax.conv_general_dilated`` 2-5x slower than PyTorch's oneDNN for most
shapes. For convolutions with few channels a matmul form is as fast as oneDNN; for wide ones XLA's
own convolution is the fastest form, once the flag ``XLA_FLAG`` keeps it off YNNPACK. This module is
the one place that knows this:

- ``conv_general_dilated``: a drop-in for ``lax.conv_general_dilated`` that computes the value
  and the input and kernel derivatives each in the form chosen by the shape (a ``custom_jvp`` lets
  the two take different forms; the thresholds below): a matmul form for few channels or a tiny
  input, ``lax``'s otherwise. The matmul form is *banded* (rows of the input times a matrix
  holding the kernel on its bands) for narrow inputs with few channels, *im2col* (shifted slices
  and one matmul) otherwise. It covers any dimension numbers, 1-D to 3-D, strides,
  padding (negative too), input and kernel dilation and feature groups; ``batch_group_count`` and
  ``preferred_element_type`` go to ``lax``. Tested equal to ``lax`` in float64.
- ``bind``: how an interpreter evaluates one primitive with these forms (``lenet_jax.explain``'s
  graph evaluator uses it, so every explanation method, for any model, runs on them). ``active()``
  says whether they apply: on the CPU backend, unless ``forms(False)`` or the environment variable
  ``LENET_JAX_CPU_FORMS=0`` turns them off. On a GPU or TPU nothing changes.
- ``configure_xla()``: adds ``XLA_FLAG`` to ``XLA_FLAGS``, which works only before JAX starts its
  CPU backend. The package's scripts and explorer call it first thing; importing the library
  changes nothing. A library user calls it before their first JAX computation.
- ``training_conv``, ``tanh``, ``avg_pool``: the forms LeNet-5's training uses (the models'
  ``cpu_kernels`` switch, chosen in ``lenet_jax.train.training_model``), measured for the training
  step; a one-channel input computes its value as shifted multiply-adds fused with the activation.

The thresholds were measured on an AMD EPYC (Zen 4) with jax 0.10.2 (docs/performance.md): for
3x3 convolutions at 28x28 the matmul form takes 0.09, 0.18, 0.60 of ``lax``'s time at 1, 2, 4
channels, and from 8 channels ``lax`` wins.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# The choice of form, by shape (measured on the AMD EPYC, docs/performance.md). A convolution's
# value takes a matmul form when its output has fewer than MATMUL_BELOW channels; its input and
# kernel derivatives when its input has fewer than MATMUL_BELOW channels and its output at most
# DERIVATIVES_UP_TO (a 3 -> 64 stem's derivatives are faster in XLA's convolution). Both take it
# when the input has at most SMALL_INPUT pixels per image: there XLA:CPU's convolution can be 65x
# slower (512 channels at 2x2: 265 ms where the matmul takes 4 ms, batch 32).
MATMUL_BELOW = 8
DERIVATIVES_UP_TO = 16
SMALL_INPUT = 16
# The matmul form is banded while the input has fewer than MATMUL_BELOW channels and is at most
# BANDED_WIDTH kernel widths wide (it costs width / kernel width times a direct convolution's
# multiply-adds, in one large matmul), im2col otherwise.
BANDED_WIDTH = 12
# XLA:CPU in jaxlib 0.10 sends convolutions with more than 16 channels to YNNPACK, slower than its
# Eigen kernels on the CPUs measured; this flag keeps them on Eigen. XLA aborts the process on a
# flag it does not know, so it is set only for the jaxlib releases it was measured with.
XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
XLA_FLAG_JAXLIB = ((0, 10),)
# Set to 0 to keep ``lax.conv_general_dilated`` and XLA's own flags.
ENV_SWITCH = "LENET_JAX_CPU_FORMS"

_ENABLED = contextvars.ContextVar("lenet_jax_cpu_forms", default=None)


def _switched_on() -> bool:
    on = _ENABLED.get()
    return os.environ.get(ENV_SWITCH, "1") != "0" if on is None else on


def active() -> bool:
    """Whether functions traced now use the forms: on the CPU backend, switched on."""
    return _switched_on() and jax.default_backend() == "cpu"


@contextlib.contextmanager
def forms(enabled: bool):
    """Within the block, functions traced use the CPU forms (``True``) or ``lax``'s convolution
    (``False``). A function already compiled keeps the forms it was traced with."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def configure_xla() -> bool:
    """Adds ``XLA_FLAG`` to the ``XLA_FLAGS`` environment variable, unless the forms are switched
    off, ``XLA_FLAGS`` already chooses the YNNPACK fusions or the installed jaxlib is not one it
    was measured with (``XLA_FLAG_JAXLIB``). It takes effect only if JAX has not started its
    backends yet: returns whether it was set."""
    import jaxlib
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    release = tuple(int(v) for v in jaxlib.__version__.split(".")[:2])
    if not _switched_on() or "ynn_fusion_type" in flags or release not in XLA_FLAG_JAXLIB:
        return False
    if xla_bridge.backends_are_initialized():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {XLA_FLAG}".strip()
    return True


def bind(prim, args, params):
    """``prim.bind(*args, **params)``, with a convolution in the form ``conv_general_dilated``
    chooses when ``active()``."""
    if prim is lax.conv_general_dilated_p and params.get("out_sharding") is None and active():
        params = {k: v for k, v in params.items() if k != "out_sharding"}
        return conv_general_dilated(*args, **params)
    return prim.bind(*args, **params)


# --------------------------------------------------------------------------- the lowering


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """``lax.conv_general_dilated``, with value and derivatives in the forms chosen by shape."""
    n = lhs.ndim - 2
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(
            _dilated(np.take(lhs.shape, dn.lhs_spec[2:]), lhs_dilation),
            _dilated(np.take(rhs.shape, dn.rhs_spec[2:]), rhs_dilation),
            window_strides,
            padding,
        )
    conv = _Conv(
        tuple(window_strides),
        tuple(map(tuple, padding)),
        tuple(lhs_dilation or (1,) * n),
        tuple(rhs_dilation or (1,) * n),
        dn,
        feature_group_count,
        precision,
    )
    reference = functools.partial(
        lax.conv_general_dilated,
        window_strides=conv.strides,
        padding=conv.padding,
        lhs_dilation=conv.lhs_dilation,
        rhs_dilation=conv.rhs_dilation,
        dimension_numbers=dn,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    out_type = preferred_element_type
    if batch_group_count != 1 or (out_type is not None and out_type != lhs.dtype) or n < 1:
        return reference(lhs, rhs)
    c_in, c_out = lhs.shape[dn.lhs_spec[1]], rhs.shape[dn.rhs_spec[0]]
    small = np.prod([lhs.shape[a] for a in dn.lhs_spec[2:]]) <= SMALL_INPUT
    value_form = c_out < MATMUL_BELOW or small
    derivative_form = (c_in < MATMUL_BELOW and c_out <= DERIVATIVES_UP_TO) or small
    if value_form and derivative_form:
        return conv(lhs, rhs)
    if not (value_form or derivative_form):
        return reference(lhs, rhs)
    return _split_forms(conv if value_form else reference, reference if value_form else conv)(
        lhs, rhs
    )


def _dilated(sizes, dilation):
    d = dilation or (1,) * len(sizes)
    return tuple((s - 1) * k + 1 if s else 0 for s, k in zip(sizes, d, strict=True))


def _split_forms(value, derivative):
    """``value(x, k)`` whose derivatives are computed through ``derivative`` (a bilinear function
    equal to ``value``); a kernel or input tangent that is zero costs nothing."""

    @jax.custom_jvp
    def fn(x, k):
        return value(x, k)

    def jvp(primals, tangents):
        (x, k), (dx, dk) = primals, tangents
        y = value(x, k)
        parts = []
        if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
            parts.append(derivative(dx, k))
        if not isinstance(dk, jax.custom_derivatives.SymbolicZero):
            parts.append(derivative(x, dk))
        tangent = functools.reduce(jnp.add, parts) if parts else jnp.zeros_like(y)
        return y, tangent

    fn.defjvp(jvp, symbolic_zeros=True)
    return fn


@dataclasses.dataclass(frozen=True)
class _Conv:
    """One convolution's configuration, computed in a matmul form by ``__call__``."""

    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    dn: lax.ConvDimensionNumbers
    groups: int
    precision: object

    def __call__(self, lhs, rhs):
        dn = self.dn
        # canonical layouts: input [N, *spatial, C], kernel [*spatial, I, O], output [N, *spatial, O]
        x = jnp.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
        k = jnp.transpose(rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))
        k = _dense_kernel(k, self.groups)
        zero = jnp.zeros((), x.dtype)
        pads = [(0, 0, 0), *((lo, hi, d - 1) for (lo, hi), d in zip(
            self.padding, self.lhs_dilation, strict=True)), (0, 0, 0)]  # fmt: skip
        x = lax.pad(x, zero, pads)
        width, kw = x.shape[-2], (k.shape[-3] - 1) * self.rhs_dilation[-1] + 1
        narrow = x.shape[-1] < MATMUL_BELOW and width <= BANDED_WIDTH * kw
        form = _banded if narrow else _im2col
        y = form(x, k, self.strides, self.rhs_dilation, self.precision)
        out = (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1])
        return jnp.transpose(y, np.argsort(out))


def _dense_kernel(k, groups):
    """A grouped kernel ``[*spatial, I / G, O]`` as the dense ``[*spatial, I, O]`` it equals (zero
    between groups)."""
    if groups == 1:
        return k
    *spatial, i, o = k.shape
    blocks = k.reshape(*spatial, i, groups, o // groups)
    dense = jnp.einsum("...igo,hg->...higo", blocks, jnp.eye(groups, dtype=k.dtype))
    return dense.reshape(*spatial, groups * i, o)


def _out_sizes(x, k, strides, dilation):
    return [
        (x.shape[1 + a] - (k.shape[a] - 1) * dilation[a] - 1) // strides[a] + 1
        for a in range(k.ndim - 2)
    ]


def _window(x, offsets, sizes, strides, dilation, axes):
    """The input seen by kernel tap ``offsets`` along ``axes``: ``[N, ..., C]``."""
    starts, limits, steps = [0] * x.ndim, list(x.shape), [1] * x.ndim
    for a, o, n, s, d in zip(axes, offsets, sizes, strides, dilation, strict=True):
        starts[1 + a] = o * d
        limits[1 + a] = o * d + (n - 1) * s + 1
        steps[1 + a] = s
    return lax.slice(x, starts, limits, steps)


def _im2col(x, k, strides, dilation, precision):
    """Every kernel tap's shifted slice side by side, times the kernel as one matrix."""
    *spatial, ci, co = k.shape
    sizes = _out_sizes(x, k, strides, dilation)
    axes = range(len(spatial))
    cols = [
        _window(x, offsets, sizes, strides, dilation, axes)
        for offsets in itertools.product(*map(range, spatial))
    ]
    cols = jnp.stack(cols, axis=-2).reshape(x.shape[0], *sizes, -1)
    return jnp.matmul(cols, k.reshape(-1, co), precision=precision)


def _banded(x, k, strides, dilation, precision):
    """Whole rows of the input along the last spatial axis (one per tap of the others), times a
    matrix holding the kernel on its bands: ``band[.., c, i, v, o] = kernel[.., j, i, o]`` where
    input column ``c = v * stride + j * dilation``. It costs width / kernel width times the
    multiply-adds of a direct convolution but runs as one large matmul, and so do its derivatives."""
    *spatial, ci, co = k.shape
    sizes = _out_sizes(x, k, strides, dilation)
    width, kw, w = x.shape[-2], spatial[-1], sizes[-1]
    lead = range(len(spatial) - 1)
    rows = [
        _window(x, offsets, sizes[:-1], strides[:-1], dilation[:-1], lead)
        for offsets in itertools.product(*(range(s) for s in spatial[:-1]))
    ]
    rows = jnp.stack(rows, axis=-3)  # [N, *out[:-1], taps, W, C]
    on_band = (
        np.arange(width)[None, :, None]
        == np.arange(w)[None, None, :] * strides[-1] + np.arange(kw)[:, None, None] * dilation[-1]
    )
    kernel = k.reshape(-1, kw, ci, co)
    band = jnp.einsum("jcv,tjio->tcivo", on_band.astype(k.dtype), kernel)
    y = jnp.matmul(
        rows.reshape(-1, band.shape[0] * width * ci),
        band.reshape(-1, w * co),
        precision=precision,
    )
    return y.reshape(x.shape[0], *sizes, co)


# --------------------------------------------------------------------------- training's forms

_NHWC = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


def training_conv(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """``lax.conv_general_dilated`` for ``nn.Conv(conv_general_dilated=...)`` in training: stride-1,
    undilated, ungrouped NHWC/HWIO convolutions in ``_conv_cpu``'s forms; anything else ``lax``'s."""
    simple = (
        tuple(window_strides) == (1, 1)
        and all(d in (None, (1, 1), [1, 1]) for d in (lhs_dilation, rhs_dilation))
        and feature_group_count == 1
        and lhs.ndim == 4
        and dimension_numbers == _NHWC
    )
    if not simple:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            precision=precision,
            **kwargs,
        )
    kh, kw = rhs.shape[:2]
    if padding == "SAME":
        padding = (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2))
    if padding != "VALID":
        lhs = jnp.pad(lhs, ((0, 0), *map(tuple, padding), (0, 0)))
    return _conv_cpu(lhs, rhs)


def _conv_cpu(x_BHWC, kernel_HWIO):
    """VALID stride-1 convolution in the form training runs fastest: a one-channel input as shifted
    multiply-adds (derivatives in a matmul form), narrow inputs (at most 8 channels, width at most
    8 kernel widths) banded, wider ones im2col."""
    _, kw, ci, _ = kernel_HWIO.shape
    banded = ci <= 8 and x_BHWC.shape[2] <= 8 * kw
    if ci == 1:
        return _conv_shifted(x_BHWC, kernel_HWIO, banded)
    return _stride1(_banded if banded else _im2col)(x_BHWC, kernel_HWIO)


def _stride1(form):
    """A matmul form as a VALID, stride-1, undilated 2-D convolution ``(x, kernel)``."""
    return lambda x, k: form(x, k, (1, 1), (1, 1), None)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv_shifted(x_BHWC, kernel_HWIO, banded):
    """VALID stride-1 convolution of a one-channel input as a sum of shifted, scaled copies.

    XLA fuses the ``kh * kw`` multiply-adds (and the activation after them) into one vectorized
    loop, about 4x faster than a matmul form for LeNet's first layer on CPU. Derivatives go
    through a matmul form (``_banded`` if ``banded``, else ``_im2col``).
    """
    kh, kw, _, co = kernel_HWIO.shape
    h, w = x_BHWC.shape[1] - kh + 1, x_BHWC.shape[2] - kw + 1
    y = 0
    for i in range(kh):
        for j in range(kw):
            y = y + x_BHWC[:, i : i + h, j : j + w, :] * kernel_HWIO[i, j].reshape(1, 1, 1, co)
    return y


@_conv_shifted.defjvp
def _conv_shifted_jvp(banded, primals, tangents):
    x, k = primals
    dx, dk = tangents
    linear = _stride1(_banded if banded else _im2col)
    return _conv_shifted(x, k, banded), linear(dx, k) + linear(x, dk)


def avg_pool(x_BHWC, window_shape, strides=None, padding="VALID"):
    """``nn.avg_pool`` for square, non-overlapping windows (``strides == window_shape``, ``"VALID"``)
    as a reshape and a mean, which XLA fuses with the layers before it; on CPU several times
    faster than ``lax.reduce_window``. Other windows go to ``nn.avg_pool``."""
    import flax.linen as nn

    w = tuple(window_shape)
    if tuple(strides or w) != w or padding != "VALID" or x_BHWC.ndim != 4:
        return nn.avg_pool(x_BHWC, window_shape, strides, padding)
    b, h, wd, c = x_BHWC.shape
    x = x_BHWC[:, : h // w[0] * w[0], : wd // w[1] * w[1]]
    return x.reshape(b, h // w[0], w[0], wd // w[1], w[1], c).mean(axis=(2, 4))


# Eigen's float32 tanh approximation, the kind XLA's CPU backend emits for ``tanh``: x p(x^2) / q(x^2)
# on x clamped to +-7.905..., the identity below 4e-4.
_TANH_P = (
    4.89352455891786e-03,
    6.37261928875436e-04,
    1.48572235717979e-05,
    5.12229709037114e-08,
    -8.60467152213735e-11,
    2.00018790482477e-13,
    -2.76076847742355e-16,
)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)


@jax.custom_jvp
def _tanh_rational(x):
    c = jnp.clip(x, -7.90531110763549805, 7.90531110763549805)
    c2 = c * c
    p = _TANH_P[-1]
    for a in _TANH_P[-2::-1]:
        p = p * c2 + a
    q = _TANH_Q[-1]
    for b in _TANH_Q[-2::-1]:
        q = q * c2 + b
    return jnp.where(jnp.abs(x) < 4e-4, x, c * p / q)


@_tanh_rational.defjvp
def _tanh_rational_jvp(primals, tangents):
    t = _tanh_rational(primals[0])
    return t, (1 - t * t) * tangents[0]


def tanh(x):
    """``jnp.tanh``, written out as arithmetic for float32.

    XLA's CPU backend evaluates its own ``tanh`` about 4x slower once it is fused with the layer
    before it; a rational approximation written as multiplies and adds fuses and vectorizes. Its
    relative error is the same as ``jnp.tanh``'s (3e-7 at most); the two differ on under 1% of
    inputs, by at most 4 ulp. The derivative is ``1 - tanh^2``, as for ``jnp.tanh``. Other dtypes
    use ``jnp.tanh``.
    """
    if x.dtype == jnp.float32:
        return _tanh_rational(x)
    return jnp.tanh(x)
