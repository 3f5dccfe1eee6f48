"""Faster CPU forms of LeNet's layers, for training on XLA:CPU: drop-in functions, tested equal.

XLA's CPU backend runs ``lax.conv_general_dilated``, a fused ``tanh`` and ``lax.reduce_window``
pooling slowly for LeNet-5's small shapes. The forms here compute the same functions as matmuls
and arithmetic XLA:CPU runs fast. They are chosen in one place, ``lenet_jax.train.training_model``
(when the backend is the CPU), through the models' ``cpu_kernels`` switch; the explanation methods
always trace the reference model, never these forms. ``tests/test_models.py`` checks each against
its reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NHWC = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


def conv_general_dilated(
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
    """``lax.conv_general_dilated`` for ``nn.Conv(conv_general_dilated=...)``, faster on CPU for
    stride-1, undilated, ungrouped NHWC/HWIO convolutions; anything else goes to ``lax``."""
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
    """VALID stride-1 convolution in the form XLA's CPU backend runs fastest for its shape.

    ``lax.conv_general_dilated`` is slow on CPU for LeNet's small shapes. Narrow inputs (at most 8
    channels, width at most 8 kernel widths) use the banded matmul; wider ones im2col. A
    one-channel input computes its values as shifted multiply-adds and its derivatives through
    the matmul form. All forms agree with ``lax.conv_general_dilated`` to float rounding.
    """
    _, kw, ci, _ = kernel_HWIO.shape
    banded = ci <= 8 and x_BHWC.shape[2] <= 8 * kw
    if ci == 1:
        return _conv_shifted(x_BHWC, kernel_HWIO, banded)
    return _conv_banded(x_BHWC, kernel_HWIO) if banded else _conv_im2col(x_BHWC, kernel_HWIO)


def _conv_im2col(x_BHWC, kernel_HWIO):
    """VALID stride-1 convolution as shifted slices (im2col) and one matmul."""
    kh, kw, ci, co = kernel_HWIO.shape
    h, w = x_BHWC.shape[1] - kh + 1, x_BHWC.shape[2] - kw + 1
    cols = jnp.concatenate(
        [x_BHWC[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    return cols @ kernel_HWIO.reshape(kh * kw * ci, co)


def _conv_banded(x_BHWC, kernel_HWIO):
    """VALID stride-1 convolution as one matmul of the input's row windows with a banded matrix.

    Row ``h`` of the output reads input rows ``h .. h+kh-1`` whole; the matrix holds the kernel on
    its bands, ``band[i, c, u, v, o] = kernel[i, c - v, u, o]`` for ``0 <= c - v < kw``. It costs
    ``W / kw`` times the multiply-adds of a direct convolution but runs as one large matmul, and
    its gradients (the kernel's: rows^T @ cotangent, then a sum along the bands) are matmuls too.
    """
    kh, kw, ci, co = kernel_HWIO.shape
    b, height, width, _ = x_BHWC.shape
    h, w = height - kh + 1, width - kw + 1
    on_band = np.arange(width)[None, :, None] == np.arange(kw)[:, None, None] + np.arange(w)
    band = jnp.einsum("jcv,ijuo->icuvo", on_band.astype(kernel_HWIO.dtype), kernel_HWIO)
    rows = jnp.stack([x_BHWC[:, i : i + h] for i in range(kh)], axis=2)  # [B, h, kh, W, Cin]
    y = rows.reshape(b * h, kh * width * ci) @ band.reshape(kh * width * ci, w * co)
    return y.reshape(b, h, w, co)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv_shifted(x_BHWC, kernel_HWIO, banded):
    """VALID stride-1 convolution of a one-channel input as a sum of shifted, scaled copies.

    XLA fuses the ``kh * kw`` multiply-adds (and the activation after them) into one vectorized
    loop, about 4x faster than a matmul form for LeNet's first layer on CPU. Derivatives go
    through the matmul form (``_conv_banded`` if ``banded``, else ``_conv_im2col``).
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
    linear = _conv_banded if banded else _conv_im2col
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
