"""Atomic file writes: a reader never sees a half-written result.

Every helper writes to a temporary file in the destination's own directory (so the final
``os.replace`` is a rename within one file system, atomic on POSIX), flushes and fsyncs it,
renames it over the destination, then fsyncs the directory (best effort) so the rename
itself survives a crash. On any error the temporary file is removed and the destination is
left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_path", "atomic_save_npy", "atomic_write_bytes", "atomic_write_json"]


def _fsync_dir(directory: Path) -> None:
    # Directory fsync makes the rename durable; not every platform/file system allows it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it to ``path``.

    For writers that need a file name rather than a file object (``open_memmap``, savefig).
    The temporary name starts with a dot and ends in ``.tmp`` so globs for results skip it.
    """
    dest = Path(path)
    directory = dest.parent
    while True:  # O_EXCL with mode 0o666: unique, and permissions follow the umask like open()
        tmp = directory / f".{dest.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        break
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the destination path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def atomic_write_json(
    path: str | os.PathLike[str], obj: Any, *, indent: int = 2, allow_nan: bool = True
) -> Path:
    """Serialize ``obj`` as JSON (keys sorted, numpy scalars/arrays converted) atomically.

    ``allow_nan=True`` (the default) writes NaN/Infinity as Python's json module does, since
    metrics such as FPR are NaN when undefined; pass ``False`` for strict RFC 8259 output.
    """
    text = json.dumps(obj, indent=indent, sort_keys=True, default=_json_default,
                      allow_nan=allow_nan)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Save ``array`` in ``.npy`` format at exactly ``path`` (no suffix added), atomically.

    Object arrays are refused (``allow_pickle=False``): a result file must never need
    unpickling to be read back.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asanyarray(array), allow_pickle=False)
            f.flush()
    return Path(path)
