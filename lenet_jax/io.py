"""Safe output: atomic file writes (a file is either complete or absent, never half-written),
folders checked before any work, and a lock that gives a folder to one process at a time."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import io
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Prefix and suffix of the temporary files of ``atomic_write_bytes``, so orphans can be found.
_TMP_PREFIX, _TMP_SUFFIX = ".", ".tmp"
LOCK_NAME = ".lock"


class OutputError(OSError):
    """A file or folder could not be written, or is in use by another process (one-line message)."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Args:
      path: destination file; its parent folders are created.
      data: the complete content.

    Returns:
      The destination as a ``Path``.

    Raises:
      OutputError: the file could not be written (read-only or full file system, a parent that is
        a file, ...); nothing is left behind.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f"{_TMP_PREFIX}{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent
        )
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise OutputError(f"could not write {path}: {_reason(e)}") from None
    except BaseException:
        _discard(tmp)
        raise
    return path


def _discard(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _reason(e: OSError) -> str:
    """``e``'s reason without the file name (the caller names the file): "Read-only file system"."""
    return e.strerror or str(e)


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


def writable_folder(path: str | os.PathLike, what: str = "--out") -> Path:
    """Creates the folder ``path`` (and its parents) and proves it writable with a temporary file.

    Called before any work, so that a user learns of a bad output location at once.

    Raises:
      OutputError: ``path`` is a file, or cannot be created or written; ``what`` names the option
        it came from in the message.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OutputError(f"cannot write into {what} {path}: {_reason(e)}") from None
    return path


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Removes the temporary files ``atomic_write_bytes`` left in ``folder`` (and its subfolders)
    when its process was killed mid-write; returns them. Call it only while holding the folder's
    lock: another writer's temporary files would look the same."""
    found = [p for p in Path(folder).rglob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


@contextlib.contextmanager
def locked_folder(path: str | os.PathLike, what: str = "--out") -> Iterator[None]:
    """Holds ``path``'s lock for the duration: one writing process per folder.

    Checks the folder first (``writable_folder``). The lock is ``fcntl.flock`` on ``path/.lock``, so
    the kernel releases it when its process dies, even by ``kill -9``: a stale lock file never
    blocks the next run. The file names its holder for the error a second process gets, and is
    removed on release; a folder this call created is removed again if nothing was written into it.

    Raises:
      OutputError: another process holds the folder (the message names it), or ``path`` is not a
        writable folder.
    """
    path = Path(path)
    created = not path.exists()
    writable_folder(path, what)
    lock = path / LOCK_NAME
    fd = _acquire(lock, path, what)
    try:
        holder = f"process {os.getpid()} on {socket.gethostname()} since {_now()}"
        os.ftruncate(fd, 0)
        os.write(fd, holder.encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only when nothing was written into it


def _acquire(lock: Path, folder: Path, what: str) -> int:
    """A descriptor of ``lock`` holding its exclusive ``flock``; retries when the file was replaced
    between opening and locking (a holder removes it on release)."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(f"cannot lock {what} {folder}: {_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputError(
                f"{folder} is in use by {holder}; wait for it to finish or choose another {what}"
            ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")
