"""Layer descriptions: the sequence a model is made of, and the pure function of each layer.

A model in this package is a sequence of these frozen dataclasses. The Flax module builds its
submodules from the sequence, and the explanation code walks the same sequence backward, so no
architecture is hard-coded anywhere but in the model's ``layers``.

Every layer has a ``name`` (unique in its model) and ``apply(params, x)``: the layer's forward
function, where ``params`` is the layer's ``{"kernel", "bias"}`` dict (``None`` for layers without
parameters). ``apply`` gives exactly what the Flax submodule computes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class Conv:
    """2-D convolution, NHWC input, HWIO kernel, stride 1."""

    name: str
    features: int
    kernel_size: tuple[int, int] = (5, 5)
    padding: str = "VALID"
    kind = "conv"
    has_params = True

    def apply(self, params, x_BHWC):
        """``[B, H, W, Cin] -> [B, H', W', features]`` with ``{"kernel" HWIO, "bias"}``: ``H' = H-kh+1``
        for ``"VALID"`` padding, ``H' = H`` for ``"SAME"`` (zeros around, as XLA pads)."""
        kernel = params["kernel"].astype(x_BHWC.dtype)
        if jax.default_backend() == "cpu":
            if self.padding == "SAME":
                kh, kw = kernel.shape[:2]
                x_BHWC = jnp.pad(
                    x_BHWC,
                    ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)),
                )
            elif self.padding != "VALID":
                raise ValueError(f"unknown padding {self.padding!r}; choose 'VALID' or 'SAME'")
            y = _conv_cpu(x_BHWC, kernel)
        else:
            y = lax.conv_general_dilated(
                x_BHWC,
                kernel,
                window_strides=(1, 1),
                padding=self.padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        return _add_bias(y, params["bias"])


def _add_bias(y, bias):
    return y + bias.astype(y.dtype).reshape((1,) * (y.ndim - 1) + bias.shape)


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


@dataclasses.dataclass(frozen=True)
class Dense:
    """Fully connected layer on ``[B, D]``."""

    name: str
    features: int
    kind = "dense"
    has_params = True

    def apply(self, params, x_BD):
        """``[B, D] -> [B, features]`` with ``{"kernel" [D, features], "bias"}``."""
        return _add_bias(x_BD @ params["kernel"].astype(x_BD.dtype), params["bias"])


@dataclasses.dataclass(frozen=True)
class AvgPool:
    """Average pooling with a square window and stride equal to the window."""

    name: str
    window: int = 2
    kind = "avg_pool"
    has_params = False

    def apply(self, params, x_BHWC):
        """``[B, H, W, C] -> [B, H//window, W//window, C]``, the window mean (a remainder of rows or
        columns is dropped, as ``"VALID"`` pooling does).

        Written as a reshape and a mean, which XLA fuses with the layers before it; on CPU this
        is several times faster than ``lax.reduce_window``.
        """
        w = self.window
        b, h, wd, c = x_BHWC.shape
        x = x_BHWC[:, : h // w * w, : wd // w * w]
        return x.reshape(b, h // w, w, wd // w, w, c).mean(axis=(2, 4))


@dataclasses.dataclass(frozen=True)
class MaxPool:
    """Max pooling with a square window and stride equal to the window."""

    name: str
    window: int = 2
    kind = "max_pool"
    has_params = False

    def apply(self, params, x_BHWC):
        """``[B, H, W, C] -> [B, H/window, W/window, C]``, the window maximum."""
        w = self.window
        return lax.reduce_window(x_BHWC, -jnp.inf, lax.max, (1, w, w, 1), (1, w, w, 1), "VALID")


@dataclasses.dataclass(frozen=True)
class Flatten:
    """``[B, H, W, C] -> [B, H*W*C]`` in NHWC order."""

    name: str
    kind = "flatten"
    has_params = False

    def apply(self, params, x):
        """``[B, H, W, C] -> [B, H*W*C]`` (NHWC order)."""
        return x.reshape(x.shape[0], -1)


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
    """``jnp.tanh``, written out as arithmetic for float32 on CPU.

    XLA's CPU backend evaluates its own ``tanh`` about 4x slower once it is fused with the layer
    before it; a rational approximation written as multiplies and adds fuses and vectorizes. Its
    relative error is the same as ``jnp.tanh``'s (3e-7 at most); the two differ on under 1% of
    inputs, by at most 4 ulp. The derivative is ``1 - tanh^2``, as for ``jnp.tanh``. Other dtypes
    and backends use ``jnp.tanh``.
    """
    if x.dtype == jnp.float32 and jax.default_backend() == "cpu":
        return _tanh_rational(x)
    return jnp.tanh(x)


ACTIVATIONS = {"tanh": tanh, "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class Activation:
    """Element-wise non-linearity, one of ``ACTIVATIONS``."""

    name: str
    fn: str = "tanh"
    kind = "activation"
    has_params = False

    def __post_init__(self):
        if self.fn not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.fn!r}; choose one of {sorted(ACTIVATIONS)}")

    def apply(self, params, x):
        """The non-linearity, element-wise, same shape."""
        return ACTIVATIONS[self.fn](x)


@dataclasses.dataclass(frozen=True)
class Dropout:
    """Dropout; the identity at evaluation, which is all ``apply`` computes."""

    name: str
    rate: float = 0.5
    kind = "dropout"
    has_params = False

    def apply(self, params, x):
        """The identity (evaluation mode); the Flax module drops units in training."""
        return x


Layer = Conv | Dense | AvgPool | MaxPool | Flatten | Activation | Dropout


def forward(layers: Sequence[Layer], params, x):
    """Runs ``layers`` in evaluation mode and keeps every layer's input.

    Args:
      layers: the model's layer sequence.
      params: the model's ``"params"`` collection (name -> ``{"kernel", "bias"}``).
      x: the model input, e.g. ``[B, 32, 32, 1]``.

    Returns:
      ``(output, inputs)``: the model output and a tuple with the input of each layer, in order.
    """
    inputs = []
    for layer in layers:
        inputs.append(x)
        x = layer.apply(params[layer.name] if layer.has_params else None, x)
    return x, tuple(inputs)
