"""Atomic file writes: a file is either complete or absent, never half-written."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Args:
      path: destination file; its parent folders are created.
      data: the complete content.

    Returns:
      The destination as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Writes ``obj`` as indented JSON, atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_savefig(fig, path: str | os.PathLike, **kwargs) -> Path:
    """Saves a matplotlib figure atomically (the format follows the file's suffix)."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", **kwargs)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_savez(path: str | os.PathLike, **arrays) -> Path:
    """Saves arrays to an ``.npz`` file atomically (compressed)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def write_report(stem: str | os.PathLike, results: dict, markdown: str) -> None:
    """Writes ``results`` to ``STEM.json`` and ``markdown`` to ``STEM.md``, each atomically."""
    stem = Path(stem)
    atomic_write_json(stem.with_suffix(".json"), results)
    atomic_write_bytes(stem.with_suffix(".md"), markdown.encode())
