"""WebDataset-style tar shards: read members by byte range, write new shards.

A sample is the group of consecutive tar members sharing a key (``KEY.jpg``, ``KEY.txt``,
``KEY.json``, ``KEY.cls``), as img2dataset and most web-scale corpora write them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass
class ShardSample:
    """One sample of a shard: byte ranges of its members inside the tar file."""

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (offset, size)
    small: dict[str, bytes] = field(default_factory=dict)  # contents of .cls / .json members

    def image_range(self) -> tuple[int, int] | None:
        for ext in IMAGE_EXTS:
            if ext in self.members:
                return self.members[ext]
        return None


def split_key(name: str) -> tuple[str, str]:
    """``dir/train_00042.jpg`` -> (``dir/train_00042``, ``jpg``): the key ends at the first dot
    of the base name, as in WebDataset."""
    head, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(head, stem) if head else stem), ext.lower()


def iter_shard(path: str | Path, hasher: hashlib._Hash | None = None) -> Iterator[ShardSample]:
    """Yield the samples of a tar shard in file order with their members' byte ranges.

    Reads the file once, sequentially; ``hasher`` (if given) is fed every byte so the caller
    gets the shard's digest in the same pass.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot open shard {path}: {e}. Check the path.") from e
    with fh:
        stream: io.RawIOBase = _HashingReader(fh, hasher) if hasher is not None else fh
        current: ShardSample | None = None
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_key(member.name)
                    if current is None or key != current.key:
                        if current is not None:
                            yield current
                        current = ShardSample(key)
                    current.members[ext] = (member.offset_data, member.size)
                    if ext in ("cls", "json", "txt"):
                        f = tar.extractfile(member)
                        current.small[ext] = f.read() if f is not None else b""
                end = tar.offset  # where the reader looked for the next header
        except tarfile.TarError as e:
            raise DataError(
                f"shard {path} is not a readable tar file ({e}); it may be truncated. "
                "Re-create it or leave it out of the index."
            ) from e
        # tarfile ends quietly at a missing or partial header; a complete archive has its
        # end-of-archive (zero) block there, a file cut at a block boundary has none.
        size = os.fstat(fh.fileno()).st_size
        if size - end < tarfile.BLOCKSIZE:
            raise DataError(
                f"shard {path} is truncated: it ends at byte {size} without the tar "
                "end-of-archive block, so samples after it are missing. Re-create it or "
                "leave it out of the index.")
        if current is not None:
            yield current
        if hasher is not None:  # hash the tail the tar reader did not consume
            while stream.read(1 << 20):
                pass


class _HashingReader(io.RawIOBase):
    def __init__(self, fh, hasher):
        self._fh, self._h = fh, hasher

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._h.update(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class ShardWriter:
    """Write samples to a tar shard atomically (temporary name, renamed on close)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, key: str, members: dict[str, bytes | str | dict | int]) -> None:
        """Add one sample; ``members`` maps an extension to bytes, text, a JSON object or an
        int (for ``cls``)."""
        for ext, value in members.items():
            if isinstance(value, dict):
                data = json.dumps(value, sort_keys=True).encode()
            elif isinstance(value, int):
                data = str(value).encode()
            elif isinstance(value, str):
                data = value.encode()
            else:
                data = bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0  # reproducible bytes: the index hash depends on them
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> Path:
        self._tar.close()
        os.replace(self._tmp, self.path)
        return self.path

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
