"""The memory-mapped sample index (DESIGN.md §4).

An index is a directory::

    records.npy     one fixed-width record per sample (RECORD_DTYPE), opened with mmap
    strings.json    string tables: shard paths (relative to the index when inside it),
                    shard digests, source domains
    metadata.json   format version, sample count, content hash, corrupt-image count

The record's position is the sample id used in every score file and report.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..io_utils import atomic_save_npy, atomic_write_json
from .shards import iter_shard

FORMAT_VERSION = 1
UNKNOWN_DOMAIN = "unknown"
FLAG_CORRUPT = 1  # the image could not be decoded when the index was built

RECORD_DTYPE = np.dtype(
    [
        ("key", "S48"),
        ("shard", "<i4"),
        ("img_offset", "<i8"),
        ("img_size", "<i8"),
        ("txt_offset", "<i8"),
        ("txt_size", "<i8"),  # -1: no caption
        ("domain", "<i4"),
        ("label", "<i4"),  # -1: unknown
        ("flags", "u1"),
    ]
)


def domain_of(url: str | None) -> str:
    """Source domain of a sample: the host of its url, lower-case, without ``www.``."""
    if not url or not isinstance(url, str):
        return UNKNOWN_DOMAIN
    try:
        host = urlparse(url).hostname or ""
    except ValueError:  # e.g. "http://[abc": not a url, so no domain
        return UNKNOWN_DOMAIN
    host = host.lower()
    return host[4:] if host.startswith("www.") else (host or UNKNOWN_DOMAIN)


def decode_image(data: bytes) -> np.ndarray:
    """Decode image bytes to an (H, W, 3) uint8 RGB array; raises DataError when corrupt."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            # an RGB image is copied once, not converted to itself first (8% of a 32x32
            # JPEG's decoding)
            return np.array(im if im.mode == "RGB" else im.convert("RGB"))
    except UnidentifiedImageError as e:  # its message names a BytesIO's address: not useful
        raise DataError(f"cannot decode image (not in a format PIL reads: {len(data)} bytes "
                        f"starting {data[:8]!r})") from e
    except Exception as e:  # PIL raises many types for broken files
        raise DataError(f"cannot decode image ({type(e).__name__}: {e})") from e


class ShardReadError(DataError):
    """A shard could not be opened or read (moved, unmounted, an I/O error, or shorter than
    when it was indexed). Not a property of one sample: scoring stops instead of recording
    the sample as skipped, so that the run can resume once the shard is back."""


class IndexWriter:
    """Builds an index directory record by record; ``close()`` writes it atomically."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self._rows: list[tuple] = []
        self._shards: list[str] = []
        self._shard_sha: list[str] = []
        self._domains: dict[str, int] = {}

    def add_shard(self, path: str | Path, sha256: str) -> int:
        self._shards.append(str(Path(path).resolve()))
        self._shard_sha.append(sha256)
        return len(self._shards) - 1

    def domain_id(self, name: str) -> int:
        return self._domains.setdefault(name, len(self._domains))

    def add(self, key: str, shard: int, img: tuple[int, int], txt: tuple[int, int] | None,
            domain: str, label: int, flags: int = 0) -> None:
        kb = key.encode()
        if len(kb) > RECORD_DTYPE["key"].itemsize:
            raise DataError(f"sample key {key!r} is longer than "
                            f"{RECORD_DTYPE['key'].itemsize} bytes; shorten the keys.")
        t_off, t_size = txt if txt is not None else (-1, -1)
        self._rows.append((kb, shard, img[0], img[1], t_off, t_size,
                           self.domain_id(domain), label, flags))

    def invalidate(self) -> None:
        """Remove an earlier index's metadata.json (its completion mark, which holds its
        hash) before any of its files is replaced, so that an interrupted rebuild leaves a
        directory that is not an index, never an old hash over new records."""
        for name in ("metadata.json", "strings.json"):
            (self.out / name).unlink(missing_ok=True)

    def close(self) -> SampleIndex:
        if not self._rows:
            raise DataError(f"no samples to index for {self.out}: the shards held no images.")
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            records = np.array(self._rows, dtype=RECORD_DTYPE)
        except OverflowError as e:
            raise DataError(f"a label or offset does not fit the index's record ({e}); labels "
                            "must be 32-bit integers.") from e
        self.invalidate()
        shards = [_relative_if_inside(p, self.out) for p in self._shards]
        domains = sorted(self._domains, key=self._domains.get)
        strings = {"shards": shards, "shard_sha256": self._shard_sha, "domains": domains}
        meta = {
            "format_version": FORMAT_VERSION,
            "n": int(len(records)),
            "hash": content_hash(records, strings),
            "n_corrupt": int(np.count_nonzero(records["flags"] & FLAG_CORRUPT)),
        }
        atomic_save_npy(self.out / "records.npy", records)
        atomic_write_json(self.out / "strings.json", strings)
        atomic_write_json(self.out / "metadata.json", meta)  # last: marks the index complete
        return SampleIndex(self.out)


def _relative_if_inside(path: str, root: Path) -> str:
    root = root.resolve()
    p = Path(path)
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def content_hash(records: np.ndarray, strings: dict) -> str:
    """sha256 over the records and the shards' digests (not their paths, so a moved index
    keeps its hash, while any change of content changes it)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(records).tobytes())
    h.update(json.dumps([strings["shard_sha256"], strings["domains"]]).encode())
    return h.hexdigest()


def build_index(shards: Sequence[str | Path], out: str | Path, verify: bool = True,
                progress: bool = False) -> SampleIndex:
    """Index WebDataset-style tar shards into ``out``.

    Each sample's label comes from ``KEY.cls`` (or ``"cls"`` in ``KEY.json``), its source
    domain from the ``url`` in ``KEY.json``, its caption from ``KEY.txt``. With ``verify``,
    every image is decoded once; a corrupt or truncated one is flagged (never indexed as
    good), reported in a warning and counted in ``metadata.json``.
    """
    writer = IndexWriter(out)
    corrupt: list[str] = []
    from tqdm.auto import tqdm

    for shard_path in tqdm(list(shards), desc="index", unit="shard", disable=not progress):
        digest = hashlib.sha256()
        pending = []
        for s in iter_shard(shard_path, digest):
            pending.append(s)
        shard_id = writer.add_shard(shard_path, digest.hexdigest())
        with open(shard_path, "rb") as fh:
            for s in pending:
                rng = s.image_range()
                if rng is None:
                    continue  # a sample without an image is not a pre-training input
                label, url = _label_and_url(s.small)
                flags = 0
                if verify:
                    fh.seek(rng[0])
                    try:
                        decode_image(fh.read(rng[1]))
                    except DataError:
                        flags |= FLAG_CORRUPT
                        corrupt.append(s.key)
                writer.add(s.key, shard_id, rng, s.members.get("txt"), domain_of(url), label,
                           flags)
    if corrupt:
        warnings.warn(
            f"{len(corrupt)} corrupt image(s) flagged and skipped (first: {corrupt[:5]}); "
            "they are listed in every result as skipped.", stacklevel=2)
    return writer.close()


def _label_and_url(small: dict[str, bytes]) -> tuple[int, str | None]:
    """A sample's label and url from its ``.cls`` / ``.json`` members; what cannot be read
    (bad UTF-8 or JSON, JSON that is not an object, a non-string url, a label outside 32-bit
    integers) counts as absent: label -1, no url."""
    label, url = -1, None
    meta = {}
    if "json" in small:
        try:
            meta = json.loads(small["json"] or b"{}")
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        url = meta.get("url") if isinstance(meta.get("url"), str) else None
    if "cls" in small:
        try:
            label = int(small["cls"].strip())
        except ValueError:
            label = -1
    elif isinstance(meta.get("cls"), int) and not isinstance(meta.get("cls"), bool):
        label = meta["cls"]
    if not -1 <= label < 2**31:
        label = -1
    return label, url


class SampleIndex:
    """Read-only view of an index directory; random access by sample id."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "metadata.json"
        if not meta_path.exists():
            raise DataError(f"{self.path} is not a sample index (no metadata.json). "
                            "Build one with `ffengine index SHARD... -o INDEX`.")
        self._files: dict[int, int] = {}  # shard -> OS file descriptor, opened lazily
        try:
            self.metadata = json.loads(meta_path.read_text())
            if self.metadata.get("format_version") != FORMAT_VERSION:
                raise DataError(f"index {self.path} has format version "
                                f"{self.metadata.get('format_version')}, this ffengine reads "
                                f"{FORMAT_VERSION}; rebuild it with `ffengine index`.")
            self.records = np.load(self.path / "records.npy", mmap_mode="r")
            strings = json.loads((self.path / "strings.json").read_text())
            self.shard_paths = [self._resolve(p) for p in strings["shards"]]
            self.domain_names: list[str] = strings["domains"]
            n = int(self.metadata["n"])
        except DataError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"index {self.path} is damaged or incomplete ({type(e).__name__}: "
                            f"{e}); rebuild it with `ffengine index`.") from e
        if self.records.dtype != RECORD_DTYPE:
            raise DataError(f"index {self.path} has records of dtype {self.records.dtype}, "
                            "not this ffengine's; rebuild it with `ffengine index`.")
        if len(self.records) != n:
            raise DataError(f"index {self.path} is inconsistent: records.npy holds "
                            f"{len(self.records)} records, metadata.json says "
                            f"{self.metadata['n']}; rebuild it.")

    def _resolve(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else self.path / q

    @property
    def hash(self) -> str:
        return self.metadata["hash"]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.records["label"])

    @property
    def domains(self) -> np.ndarray:
        return np.asarray(self.records["domain"])

    @property
    def corrupt(self) -> np.ndarray:
        """Ids flagged corrupt when the index was built."""
        return np.flatnonzero(np.asarray(self.records["flags"]) & FLAG_CORRUPT)

    def key(self, i: int) -> str:
        return bytes(self.records["key"][i]).decode()

    def keys(self) -> list[str]:
        return [k.decode() for k in np.asarray(self.records["key"])]

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        # os.pread: no shared file offset, so DataLoader workers forked with this index's
        # descriptors open never read each other's bytes
        if not 0 <= shard < len(self.shard_paths):
            raise DataError(f"a record of index {self.path} names shard {shard}, which the "
                            f"index does not have ({len(self.shard_paths)} shards); rebuild "
                            "it with `ffengine index`.")
        path = self.shard_paths[shard]
        try:
            fd = self._files.get(shard)
            if fd is None:
                fd = self._files[shard] = os.open(path, os.O_RDONLY)
            data = os.pread(fd, size, offset) if size >= 0 and offset >= 0 else b""
        except OSError as e:
            raise ShardReadError(f"shard {path} of index {self.path} cannot be read ({e}); "
                                 "was it moved? Restore it and run again: finished work is "
                                 "kept.") from e
        if len(data) != size:
            raise ShardReadError(f"shard {path} is truncated, shorter than when it was "
                                 f"indexed: wanted {size} bytes at offset {offset}, got "
                                 f"{len(data)}. Restore it, or rebuild the index.")
        return data

    def image_bytes(self, i: int) -> bytes:
        r = self.records[i]
        return self._read(int(r["shard"]), int(r["img_offset"]), int(r["img_size"]))

    def image(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB image of sample ``i``; DataError if it cannot be decoded."""
        data = self.image_bytes(i)  # ShardReadError passes through: not this sample's fault
        try:
            return decode_image(data)
        except DataError as e:
            raise DataError(f"sample {i} ({self.key(i)}): {e}") from e

    def caption(self, i: int) -> str | None:
        r = self.records[i]
        if int(r["txt_size"]) < 0:
            return None
        data = self._read(int(r["shard"]), int(r["txt_offset"]), int(r["txt_size"]))
        try:
            return data.decode()
        except UnicodeDecodeError as e:
            raise DataError(f"sample {i} ({self.key(i)}): its caption is not UTF-8 "
                            f"({e}).") from e

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __enter__(self) -> SampleIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # shard handles are opened lazily; close them with the index
        files = getattr(self, "_files", None)
        if files:
            self.close()

    def __getstate__(self):  # file handles stay per process (DataLoader workers)
        state = self.__dict__.copy()
        state["_files"] = {}
        state["records"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.records = np.load(self.path / "records.npy", mmap_mode="r")


def index_image_folder(root: str | Path, out: str | Path, domain: str = UNKNOWN_DOMAIN,
                       verify: bool = True) -> SampleIndex:
    """Adapter: index an ImageFolder-style tree (``root/CLASS/*.jpg``). Each file is its own
    shard with offset 0; labels are the sorted class folder names' positions."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders; expected root/CLASS/IMAGE files.")
    writer = IndexWriter(out)
    corrupt = []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower().lstrip(".") not in ("jpg", "jpeg", "png", "webp", "bmp"):
                continue
            data = f.read_bytes()
            shard = writer.add_shard(f, hashlib.sha256(data).hexdigest())
            flags = 0
            if verify:
                try:
                    decode_image(data)
                except DataError:
                    flags, corrupt = FLAG_CORRUPT, corrupt + [str(f)]
            writer.add(f"{cls}/{f.stem}", shard, (0, len(data)), None, domain, label, flags)
    if corrupt:
        warnings.warn(f"{len(corrupt)} corrupt image(s) flagged and skipped: {corrupt[:5]}",
                      stacklevel=2)
    return writer.close()


def index_arrays(images: np.ndarray | Iterable[np.ndarray], out: str | Path,
                 labels: Sequence[int] | None = None, keys: Sequence[str] | None = None,
                 domains: Sequence[str] | None = None, captions: Sequence[str] | None = None,
                 image_format: str = "png") -> SampleIndex:
    """Adapter: in-memory uint8 images (N, H, W, 3) are encoded (PNG keeps the pixels exact)
    into a pack file inside the index directory."""

    def samples():
        for i, img in enumerate(images):
            img = np.asarray(img)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise DataError(f"image {i} has dtype {img.dtype} and shape {img.shape}; "
                                "expected uint8 (H, W, 3).")
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format=image_format.upper())
            yield PackedSample(
                key=keys[i] if keys is not None else f"{i:09d}",
                image=buf.getvalue(),
                label=int(labels[i]) if labels is not None else -1,
                domain=domains[i] if domains is not None else UNKNOWN_DOMAIN,
                caption=captions[i] if captions is not None else None,
            )

    return write_pack(samples(), out)


@dataclass
class PackedSample:
    key: str
    image: bytes  # encoded image file
    label: int = -1
    domain: str = UNKNOWN_DOMAIN
    caption: str | None = None


def write_pack(samples: Iterable[PackedSample], out: str | Path) -> SampleIndex:
    """Write encoded samples into ``out/pack.bin`` (images and captions concatenated, no
    per-member headers: the compact form of the bundled demo data) and index it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pack = out / "pack.bin"
    tmp = pack.with_name("pack.bin.tmp")
    writer = IndexWriter(out)
    rows = []
    digest = hashlib.sha256()
    with open(tmp, "wb") as fh:
        for s in samples:
            off = fh.tell()
            fh.write(s.image)
            digest.update(s.image)
            txt = None
            if s.caption is not None:
                cb = s.caption.encode()
                txt = (fh.tell(), len(cb))
                fh.write(cb)
                digest.update(cb)
            rows.append((s.key, (off, len(s.image)), txt, s.domain, s.label))
    writer.invalidate()  # the old records must not outlive their pack
    os.replace(tmp, pack)
    shard = writer.add_shard(pack, digest.hexdigest())
    for key, img_rng, txt, dom, lab in rows:
        writer.add(key, shard, img_rng, txt, dom, lab)
    return writer.close()
