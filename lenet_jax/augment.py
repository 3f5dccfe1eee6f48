"""On-device augmentation: random rotations and shifts drawn per image inside the jitted step."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lenet_jax.data import normalized_range


def affine(x_BHWC, angle_B, shift_B2, fill):
    """Rotates each image by ``angle_B`` radians (clockwise on screen, about its center), then moves it
    by ``shift_B2`` pixels (rows down, columns right), with bilinear interpolation.

    Pixels that come from outside the image take the value ``fill`` (scalar or ``[C]``).
    """
    b, h, w, c = x_BHWC.shape
    rows, cols = jnp.meshgrid(
        jnp.arange(h, dtype=x_BHWC.dtype) - (h - 1) / 2,
        jnp.arange(w, dtype=x_BHWC.dtype) - (w - 1) / 2,
        indexing="ij",
    )
    cos, sin = jnp.cos(angle_B)[:, None, None], jnp.sin(angle_B)[:, None, None]
    # the inverse map: where in the source image each output pixel comes from
    dr = rows[None] - shift_B2[:, 0, None, None]
    dc = cols[None] - shift_B2[:, 1, None, None]
    src_r = cos * dr - sin * dc + (h - 1) / 2
    src_c = sin * dr + cos * dc + (w - 1) / 2
    fill = jnp.broadcast_to(jnp.asarray(fill, x_BHWC.dtype), (c,))

    def one(img_HWC, r, q):
        def channel(img_HW, f):
            return jax.scipy.ndimage.map_coordinates(img_HW - f, [r, q], order=1, cval=0.0) + f

        return jax.vmap(channel, in_axes=(2, 0), out_axes=2)(img_HWC, fill)

    return jax.vmap(one)(x_BHWC, src_r, src_c)


def random_affine(key: jax.Array, x_BHWC, *, max_shift: float, max_rotate: float, fill):
    """``affine`` with one random draw per image: an angle uniform in ``±max_rotate`` degrees and a
    shift uniform in ``±max_shift`` pixels per axis."""
    b = x_BHWC.shape[0]
    k_angle, k_shift = jax.random.split(key)
    angle = jax.random.uniform(k_angle, (b,), x_BHWC.dtype, -max_rotate, max_rotate)
    shift = jax.random.uniform(k_shift, (b, 2), x_BHWC.dtype, -max_shift, max_shift)
    return affine(x_BHWC, jnp.deg2rad(angle), shift, fill)


def make_augment(config, dataset: str = "mnist") -> Callable | None:
    """``augment(key, images)`` for ``train_step`` from a ``TrainConfig``'s augmentation settings (pixels
    moved in from outside the image are the dataset's black), or ``None`` when both are 0."""
    if not (config.augment_shift or config.augment_rotate):
        return None
    black = normalized_range(dataset)[0]

    def augment(key, x):
        return random_affine(
            key, x, max_shift=config.augment_shift, max_rotate=config.augment_rotate, fill=black
        )

    return augment
