"""Reading your own pictures: inversion, MNIST's layout, color datasets, and clear errors."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from lenet_jax.image_files import mnist_layout, read_image, read_images


def save(path, pixels):
    """Saves gray ``[H, W]`` or RGB(A) ``[H, W, C]`` pixels in [0, 1] as an image file."""
    if pixels.ndim == 2:
        plt.imsave(path, pixels, cmap="gray", vmin=0, vmax=1)
    else:
        plt.imsave(path, pixels)
    return path


def test_mnist_digits_drawn_dark_on_light_and_enlarged_come_back_as_mnist_digits(mnist, tmp_path):
    images = mnist["test"][0][:50]
    correlations = []
    for i, digit in enumerate(images):
        paper = 1.0 - np.kron(digit / 255.0, np.ones((3, 3)))  # 84x84, dark ink on white
        back = read_image(save(tmp_path / f"{i}.png", paper))
        assert back.shape == (28, 28) and back.dtype == np.uint8
        rows, cols = np.nonzero(back > 0.1 * back.max())
        assert max(np.ptp(rows), np.ptp(cols)) + 1 == 20  # MNIST's 20x20 box
        mass = back.astype(float) / back.sum()
        assert abs(mass.sum(1) @ np.arange(28) - 14) <= 0.5  # centered by mass on pixel 14
        assert abs(mass.sum(0) @ np.arange(28) - 14) <= 0.5
        correlations.append(np.corrcoef(back.ravel(), digit.ravel())[0, 1])
    # MNIST's own digits satisfy the same layout, so they come back nearly unchanged
    assert np.median(correlations) > 0.98 and np.mean(np.array(correlations) > 0.95) >= 0.9


def test_mnist_layout_scales_the_box_and_centers_the_mass():
    bar = np.zeros((60, 80))
    bar[20:30, 10:50] = 0.8  # a 10x40 bar -> 5x20 after scaling
    field = mnist_layout(bar)
    expected = np.zeros((28, 28))
    # mass center (2, 9.5) in the 5x20 box -> top 12, left round(4.5) = 4
    expected[12:17, 4:24] = 0.8
    np.testing.assert_allclose(field, expected, atol=1e-6)


def test_light_on_dark_transparent_and_jpeg_pictures_read_alike(tmp_path):
    picture = np.zeros((56, 56))
    picture[10:46, 24:32] = 1.0  # a "1", light on dark
    picture[10:18, 16:24] = 1.0
    reference = read_image(save(tmp_path / "light.png", picture))
    np.testing.assert_array_equal(read_image(save(tmp_path / "dark.png", 1.0 - picture)), reference)
    rgba = np.zeros((56, 56, 4))  # black ink, transparent paper
    rgba[..., 3] = picture
    np.testing.assert_array_equal(read_image(save(tmp_path / "alpha.png", rgba)), reference)
    jpeg = read_image(save(tmp_path / "dark.jpg", 1.0 - picture))
    assert np.abs(jpeg.astype(int) - reference).mean() < 4  # lossy, but the same digit
    stacked = read_images([tmp_path / "light.png", tmp_path / "dark.png"])
    assert stacked.shape == (2, 28, 28)


@pytest.mark.parametrize("dataset, shape", [("cifar10", (32, 32, 3)), ("fashion_mnist", (28, 28))])
def test_other_datasets_are_resized_to_their_image_size(tmp_path, dataset, shape):
    picture = np.zeros((64, 48, 3))
    picture[..., 0] = 0.2  # a dark-red field with a brighter square
    picture[16:48, 12:36] = (0.9, 0.6, 0.3)
    image = read_image(save(tmp_path / "p.png", picture), dataset)
    assert image.shape == shape and image.dtype == np.uint8
    center, corner = image[shape[0] // 2, shape[1] // 2], image[0, 0]
    # 8-bit PNG quantization: within 1 of the exact values
    if dataset == "cifar10":
        np.testing.assert_allclose(center, 255 * np.array([0.9, 0.6, 0.3]), atol=1)
        np.testing.assert_allclose(corner, [51, 0, 0], atol=1)
    else:  # gray: luma, the dark border kept as the background (not inverted)
        np.testing.assert_allclose(center, 255 * (0.299 * 0.9 + 0.587 * 0.6 + 0.114 * 0.3), atol=1)
        np.testing.assert_allclose(corner, 255 * 0.299 * 0.2, atol=1)


def test_bad_files_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=f"^no such image file: {tmp_path / 'none.png'}$"):
        read_image(tmp_path / "none.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="^cannot read image .*text.png: "):
        read_image(tmp_path / "text.png")
    with pytest.raises(ValueError, match="blank"):
        read_image(save(tmp_path / "white.png", np.ones((30, 30))))
    with pytest.raises(ValueError, match="no image files given"):
        read_images([])


def huge_png(width, height) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels and whose data is one tiny image:
    what a decompression bomb looks like before it is decoded."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_a_huge_picture_is_refused_from_its_header_before_decoding(tmp_path):
    from lenet_jax.image_files import MAX_PIXELS, decode_image

    limit = r"; the largest picture read is 16,777,216 pixels \(e.g. 4096x4096\)$"
    with pytest.raises(ValueError, match="^the picture is 196,000,000 pixels" + limit):
        decode_image(huge_png(14000, 14000))  # above Pillow's own limit
    with pytest.raises(ValueError, match="^the picture is 5000x5000 pixels" + limit):
        decode_image(huge_png(5000, 5000))
    path = tmp_path / "bomb.png"
    path.write_bytes(huge_png(10000, 10000))
    with pytest.raises(ValueError, match=f"^image {path} is 10000x10000 pixels" + limit):
        read_image(path)
    assert MAX_PIXELS == 4096 * 4096
    # at the limit the header passes and the (truncated) data is what fails, in one line
    with pytest.raises(ValueError, match=r"^cannot read the picture: "):
        decode_image(huge_png(4096, 4096))


def test_a_jpeg_upload_reads_like_the_same_png(tmp_path):
    import io

    from PIL import Image

    from lenet_jax.image_files import decode_image

    paper = np.full((84, 84), 255, np.uint8)
    paper[20:64, 38:46] = 0  # a dark vertical stroke: a "1"
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(paper).save(jpeg, "JPEG", quality=95)
    Image.fromarray(paper).save(png, "PNG")
    a, b = decode_image(jpeg.getvalue()), decode_image(png.getvalue())
    assert a.shape == b.shape == (28, 28)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 12  # JPEG's loss
