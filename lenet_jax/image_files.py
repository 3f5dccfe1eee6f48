"""Your own pictures as dataset images: read an image file the way the dataset's images were made.

``read_image("my_seven.png")`` gives a uint8 image in the dataset's stored layout, ready for
``models.ModelInput.preprocess``: gray datasets get one channel, light strokes on a dark background
(a picture with a bright border, i.e. dark ink on paper, is inverted), and MNIST's own normalization — the
digit's bounding box scaled to fit 20×20 pixels with its aspect ratio kept, then placed in the
28×28 field with its center of mass at the center (LeCun et al., the MNIST database's description).
Other datasets are resized to their image size.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax.data import get_dataset

# ITU-R BT.601 luma, as Pillow's "L" conversion.
_LUMA = np.array([0.299, 0.587, 0.114])
MNIST_BOX = 20  # the side of the box MNIST's digits were scaled into
# The largest picture read: its header is checked before decoding, so that a small compressed file
# cannot make a huge image (a 200 KB PNG can hold 14000x14000 pixels).
MAX_SIDE = 4096
MAX_PIXELS = MAX_SIDE * MAX_SIDE


def read_image(path: str | os.PathLike, dataset: str = "mnist") -> np.ndarray:
    """One image file as a uint8 image of ``dataset``: ``[H, W]`` (gray) or ``[H, W, C]`` (color).

    Reads what Pillow reads (PNG, JPEG, ...), up to ``MAX_PIXELS`` pixels (checked from the
    header, before decoding). Transparent pixels are composited onto white.

    Raises:
      ValueError: a missing or unreadable file, or (gray datasets) a blank image.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such image file: {path}")
    return as_dataset_image(_read_rgb(path, f"image {path}"), dataset, f"image {path}")


def decode_image(data: bytes, dataset: str = "mnist") -> np.ndarray:
    """``read_image`` of a picture's bytes (e.g. an uploaded PNG or JPEG)."""
    return as_dataset_image(_read_rgb(io.BytesIO(data), "the picture"), dataset, "the picture")


def as_dataset_image(rgb, dataset: str = "mnist", what: str = "the picture") -> np.ndarray:
    """An RGB picture ``[H, W, 3]`` (floats in [0, 1]) made into a uint8 image of ``dataset`` as
    ``read_image`` describes: gray, light on dark, laid out as an MNIST digit (for MNIST)."""
    ds = get_dataset(dataset)
    if ds.channels == 3:
        return _to_uint8(_resize(rgb, ds.image_shape[:2]))
    gray = rgb @ _LUMA
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 0.5:  # dark ink on a light background -> light on dark, as the dataset
        gray = 1.0 - gray
    if gray.max() - gray.min() < 1e-3:
        raise ValueError(f"{what} is blank (one flat color)")
    if ds.name == "mnist":
        gray = mnist_layout(gray)
    else:
        gray = _resize(gray[..., None], ds.image_shape[:2])[..., 0]
    return _to_uint8(gray)


def read_images(paths, dataset: str = "mnist") -> np.ndarray:
    """``read_image`` of each path, stacked: uint8 ``[N, H, W]`` or ``[N, H, W, C]``."""
    if not paths:
        raise ValueError("no image files given")
    return np.stack([read_image(p, dataset) for p in paths])


def mnist_layout(gray, size: int = 28, box: int = MNIST_BOX) -> np.ndarray:
    """A light-on-dark gray picture ``[H, W]`` (values in [0, 1]) laid out as an MNIST digit.

    The bounding box of the pixels above 10% of the brightest is scaled (antialiased bilinear) so
    its longer side is ``box`` pixels, and put in a ``size × size`` field with its center of mass
    on pixel ``size // 2`` (shifted by whole pixels, as MNIST's digits were), kept inside the field.

    Returns:
      float ``[size, size]`` in [0, 1].
    """
    gray = np.clip(np.asarray(gray, np.float64), 0.0, 1.0)
    gray = gray - gray.min()
    rows, cols = np.nonzero(gray > 0.1 * gray.max())
    crop = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = box / max(crop.shape)
    shape = tuple(max(1, round(s * scale)) for s in crop.shape)
    digit = np.clip(_resize(crop[..., None], shape)[..., 0], 0.0, 1.0)
    h, w = digit.shape
    mass = digit.sum()
    cy = (digit.sum(1) @ np.arange(h)) / mass  # in pixel indices
    cx = (digit.sum(0) @ np.arange(w)) / mass
    top = int(np.clip(round(size // 2 - cy), 0, size - h))
    left = int(np.clip(round(size // 2 - cx), 0, size - w))
    field = np.zeros((size, size))
    field[top : top + h, left : left + w] = digit
    return field


def _read_rgb(source, what: str) -> np.ndarray:
    """The picture as RGB floats ``[H, W, 3]`` in [0, 1], its size checked from the header before
    any pixel is decoded (a small compressed file can hold a huge image)."""
    from PIL import Image

    limit = f"the largest picture read is {MAX_PIXELS:,} pixels (e.g. {MAX_SIDE}x{MAX_SIDE})"
    try:
        image = Image.open(source)
        width, height = image.size
    except Image.DecompressionBombError as e:  # Pillow's own limit, far above ours
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
        raise ValueError(f"{what} is {size}; {limit}") from None
    except Exception as e:  # Pillow raises several kinds for a non-image
        raise ValueError(f"cannot read {what}: {type(e).__name__}: {e}") from None
    with image:
        if width * height > MAX_PIXELS:
            raise ValueError(f"{what} is {width}x{height} pixels; {limit}")
        try:
            img = _pixels(image)
        except Exception as e:
            raise ValueError(f"cannot read {what}: {type(e).__name__}: {e}") from None
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] in (2, 4):  # with alpha: composite onto white
        color, alpha = img[..., :-1], img[..., -1:]
        img = color * alpha + (1.0 - alpha)
    return np.broadcast_to(img, (*img.shape[:2], 3)) if img.shape[-1] == 1 else img


def _pixels(image) -> np.ndarray:
    """A Pillow image's pixels as floats in [0, 1]: gray, gray + alpha, RGB or RGBA."""
    if image.mode.startswith("I;16"):
        return np.asarray(image, np.float32) / 65535.0
    if image.mode not in ("1", "L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA")
    img = np.asarray(image)
    if img.dtype == bool:
        return img.astype(np.float32)
    return img.astype(np.float32) / 255.0


def _resize(img_HWC, shape) -> np.ndarray:
    """Antialiased bilinear resize of ``[H, W, C]`` to ``shape`` (``jax.image.resize``)."""
    out = jax.image.resize(jnp.asarray(img_HWC, jnp.float32), (*shape, img_HWC.shape[-1]), "linear")
    return np.asarray(out, np.float64)


def _to_uint8(img) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
