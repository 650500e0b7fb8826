"""The resumable, shardable store behind a trace result directory.

While a trace is unfinished its result directory holds::

    metadata.json             what the results belong to: run (model config, checkpoints with
                              their SHA-256), index (hash, size), instances (SHA-256 of their
                              pixels) and every option that changes a score; written first,
                              checked before any work when a trace is started again
    partial/                  the unfinished work, one set of files per rank r:
        terms-rank{r}.npy     (T, D, n_r, K) float32 memmap of rank r's chunks, in scoring order
        done-rank{r}.jsonl    the done-record: one JSON line per finished (checkpoint, chunk)
                              piece, appended and fsynced after the piece's terms are flushed
        scores-rank{r}.npy    (n_r, K) and (n_r,) scores of rank r's samples, written when
        detection-rank{r}.npy all its pieces are done
        rank{r}.lock          flock held by the process working on rank r's files

A *piece* is one checkpoint ``t`` scored on one chunk ``j`` of ``chunk_size`` samples
(``Engine.chunks``); chunk ``j`` belongs to rank ``j % world_size`` and sits at offset
``(j // world_size) * chunk_size`` of that rank's file, so ranks never write the same file.
A piece is recorded only after its terms are on disk, and a piece is scored only if it is not
recorded: a process killed at any instant loses at most the pieces it was working on, and
the restarted process scores exactly those. Scores do not depend on which pieces ran when,
so the result is bit-for-bit that of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..data.index import SampleIndex
from ..errors import DataError, FFEngineError, ManifestMismatchError
from ..io_utils import atomic_path, atomic_write_json
from .instance import Instance
from .scoring import Engine, aggregate_draws, detection_scores

__all__ = [
    "PARTIAL_DIR",
    "RESULT_FORMAT_VERSION",
    "ChunkLayout",
    "DoneLog",
    "RankStore",
    "assemble",
    "check_metadata",
    "file_sha256",
    "instance_sha256",
    "open_result_dir",
    "result_metadata",
]

RESULT_FORMAT_VERSION = 2
METADATA = "metadata.json"
SUMMARY = "summary.json"
PARTIAL_DIR = "partial"
# Recorded for the reader but not compared on resume: moving a run, index or instance
# directory does not change a score (their contents are compared through their hashes).
_UNCHECKED = ("ffengine", "created", "run.path", "index.path", "instances[*].path")
_BLOCK = 1 << 16  # samples per block when aggregating and assembling
RESULT_FILES = (METADATA, SUMMARY, "terms.npy", "scores.npy", "detection_scores.npy",
                "flagged.npy", "domains.json", "domains.txt", "scores.png")


# --------------------------------------------------------------------------------------
# metadata.json
# --------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def instance_sha256(inst: Instance) -> str:
    """Hash of an instance's two images (pixels and shapes); its metadata does not count."""
    h = hashlib.sha256()
    for img in (inst.x_b, inst.x_r):
        a = np.ascontiguousarray(img, dtype=np.uint8)
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def instances_digest(instances: Sequence[Instance]) -> str:
    """A short name for a set of instances (12 hex digits of their hashes): demos put one
    trace per instance set in a directory of its own, so a changed instance never meets
    the results of another."""
    h = hashlib.sha256()
    for inst in instances:
        h.update(instance_sha256(inst).encode())
    return h.hexdigest()[:12]


def result_metadata(engine: Engine, index: SampleIndex, instances: Sequence[Instance],
                    k: float, world_size: int = 1,
                    instance_paths: Sequence[str] | None = None,
                    threshold: str = "mad") -> dict:
    """Everything a trace result depends on, as written to ``metadata.json``. The
    threshold rule is recorded only where it is not the MAD rule's, so that results written
    before the option existed still match."""
    run = engine.run
    paths = list(instance_paths or [])
    rule = {} if threshold == "mad" else {"threshold": threshold}
    return {
        "format_version": RESULT_FORMAT_VERSION,
        "ffengine": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": {"path": str(run.path), "model": run.manifest["model"],
                "scored_layers": list(run.scored_layers),
                "objective": run.manifest["objective"],
                "augment": run.manifest.get("augment")},
        "checkpoints": [{"epoch": c.epoch, "step": c.step, "lr": c.lr,
                         "weights": c.weights.name, "sha256": file_sha256(c.weights)}
                        for c in engine.checkpoints],
        "index": {"path": str(index.path), "hash": index.hash, "n": len(index)},
        "instances": [{"path": paths[i] if i < len(paths) else None,
                       "sha256": instance_sha256(inst)} for i, inst in enumerate(instances)],
        "options": {**engine.options(), "k": float(k), "world_size": int(world_size),
                    **rule},
    }


_ABSENT = object()


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for key in sorted(obj):
            yield from _flatten(obj[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list) and any(isinstance(v, dict | list) for v in obj):
        yield f"len({prefix})", len(obj)
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def _unchecked(key: str) -> bool:
    import fnmatch

    pattern_key = key.replace("[", "<").replace("]", ">")
    return any(fnmatch.fnmatchcase(pattern_key, p.replace("[*]", "<*>")) for p in _UNCHECKED)


def _report_order(key: str) -> tuple[int, str]:
    """Options first: they are what a user most often changes by mistake."""
    bare = key[4:] if key.startswith("len(") else key
    top = bare.split(".")[0].split("[")[0].rstrip(")")
    rank = ["format_version", "options", "index", "instances", "checkpoints", "run"]
    return (rank.index(top) if top in rank else len(rank), key)


def metadata_differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, value there, value now) for every compared key that differs."""
    a, b = dict(_flatten(old)), dict(_flatten(new))
    out = []
    for key in sorted(set(a) | set(b), key=_report_order):
        if _unchecked(key):
            continue
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va != vb:
            out.append((key, "<absent>" if va is _ABSENT else va,
                        "<absent>" if vb is _ABSENT else vb))
    return out


def check_metadata(path: Path, old: dict, new: dict) -> None:
    """Raise ManifestMismatchError naming the first differing key, both values and ``path``."""
    if old.get("format_version") != RESULT_FORMAT_VERSION:
        raise ManifestMismatchError(
            f"{path} has result format version {old.get('format_version')!r}, this ffengine "
            f"writes {RESULT_FORMAT_VERSION}: it is not a resumable trace of this version. "
            "Trace into a new output directory, or delete that one.")
    diffs = metadata_differences(old, new)
    if not diffs:
        return
    key, there, now = diffs[0]
    more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:6])})" \
        if len(diffs) > 1 else ""
    hint = (" The ranks own different chunks with another process count: restart with "
            "the same number of processes." if key == "options.world_size" else "")
    raise ManifestMismatchError(
        f"{path} was written for {key} = {there!r}, but this trace has {key} = {now!r}"
        f"{more}. A result directory resumes only the trace it was started for: run with "
        f"the same run, index, instances and options, or choose another output directory."
        f"{hint}")


def open_result_dir(out: Path, meta: dict) -> str:
    """Create or validate ``out``'s metadata before any work. Returns ``"new"``, ``"resume"``
    (unfinished work found) or ``"complete"`` (a finished trace of the same inputs)."""
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / METADATA
    if not mpath.exists():
        if (out / PARTIAL_DIR).exists():
            raise DataError(f"{out / PARTIAL_DIR} exists but {mpath} does not, so it is not "
                            "the work of an ffengine trace; choose another output directory.")
        found = [f for f in RESULT_FILES if (out / f).exists()]
        if found:
            # results of unknown inputs: never overwritten, never taken for this trace's
            raise DataError(f"{out} holds trace results ({', '.join(found[:3])}) but no "
                            f"{METADATA}, so they cannot be checked against this trace; "
                            "choose another output directory, or delete them.")
        atomic_write_json(mpath, meta)
        return "new"
    try:
        old = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {mpath} ({e}); delete the directory or choose another "
                        "output directory.") from e
    check_metadata(mpath, old, meta)
    if (out / SUMMARY).exists():
        return "complete"
    return "resume" if (out / PARTIAL_DIR).exists() else "new"


# --------------------------------------------------------------------------------------
# where the chunks of a rank live
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkLayout:
    """Chunk ``j`` of ``n`` samples (``chunk_size`` each, the last one shorter) belongs to rank
    ``j % world_size`` and occupies local positions ``(j // world_size) * chunk_size + [0,
    len)`` of that rank's files."""

    n: int
    chunk_size: int
    world_size: int
    rank: int

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_size)

    @property
    def owned(self) -> range:
        return range(self.rank, self.n_chunks, self.world_size)

    def chunk_len(self, j: int) -> int:
        return min(self.chunk_size, self.n - j * self.chunk_size)

    def offset(self, j: int) -> int:
        return (j // self.world_size) * self.chunk_size

    @property
    def n_local(self) -> int:
        return sum(self.chunk_len(j) for j in self.owned[-1:]) + \
            self.chunk_size * max(0, len(self.owned) - 1)

    def order_positions(self, start: int, stop: int) -> np.ndarray:
        """Positions in the global scoring order of local positions ``[start, stop)``."""
        p = np.arange(start, stop, dtype=np.int64)
        local_chunk, within = np.divmod(p, self.chunk_size)
        return (local_chunk * self.world_size + self.rank) * self.chunk_size + within


# --------------------------------------------------------------------------------------
# the done-record
# --------------------------------------------------------------------------------------
class DoneLog:
    """Append-only JSON lines, one per finished piece: ``{"t", "chunk", "skipped", "pid"}``.

    Each line is appended with one ``write`` and fsynced. A process killed mid-write can
    leave a torn last line without its newline; opening for append cuts it off (that piece
    was not recorded, so it is scored again).
    """

    def __init__(self, path: Path, writable: bool = True):
        self.path = path
        self.done: dict[tuple[int, int], dict] = {}
        self._fd: int | None = None
        data = path.read_bytes() if path.exists() else b""
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            if writable:
                os.truncate(path, len(data))
        for lineno, line in enumerate(data.splitlines(), 1):
            try:
                rec = json.loads(line)
                key = (int(rec["t"]), int(rec["chunk"]))
                rec["skipped"] = [(int(i), str(r)) for i, r in rec["skipped"]]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}, line {lineno}, is not a done-record ({e}); the "
                                "directory is damaged: delete it and trace again.") from e
            if key in self.done:
                raise DataError(f"{path} records piece {key} twice (line {lineno}); the "
                                "directory is damaged: delete it and trace again.")
            self.done[key] = rec
        if writable:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)

    def record(self, t: int, chunk: int, skipped: Sequence[tuple[int, str]]) -> None:
        rec = {"t": t, "chunk": chunk, "skipped": [[int(i), str(r)] for i, r in skipped],
               "pid": os.getpid()}
        line = (json.dumps(rec, sort_keys=True) + "\n").encode()
        if self._fd is None:
            raise FFEngineError(f"{self.path} was opened read-only.")
        written = os.write(self._fd, line)
        if written != len(line):  # a full disk: the torn line is cut off on the next open
            raise OSError(f"wrote {written} of {len(line)} bytes to {self.path}; is the disk "
                          "full? Free space and trace again: finished pieces are kept.")
        os.fsync(self._fd)
        self.done[(t, chunk)] = rec

    def skipped(self) -> dict[int, str]:
        """{sample id: reason} of every sample a recorded piece could not decode."""
        return {int(i): r for rec in self.done.values() for i, r in rec["skipped"]}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------------------
# one rank's files
# --------------------------------------------------------------------------------------
def _open_or_create(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """The float32 ``.npy`` memmap at ``path``, created zero-filled (atomically) if absent."""
    if not path.exists():
        with atomic_path(path) as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            mm.flush()
            del mm
    try:
        mm = np.load(path, mmap_mode="r+", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot open {path} ({e}); the directory is damaged: delete it and "
                        "trace again.") from e
    if mm.shape != shape or mm.dtype != np.float32:
        raise DataError(f"{path} holds {mm.dtype} {mm.shape}, expected float32 {shape}; the "
                        "directory is damaged: delete it and trace again.")
    return mm


def _write_npy(path: Path, shape: tuple[int, ...],
               blocks: Iterator[tuple[slice, np.ndarray]]) -> None:
    """Write a float32 ``.npy`` of ``shape`` block by block (along axis 0), atomically."""
    with atomic_path(path) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        for where, values in blocks:
            mm[where] = values
        mm.flush()
        del mm


def _remove_stale_temporaries(directory: Path, marks: tuple[str, ...]) -> None:
    """Delete the temporary files (io_utils.atomic_path names: ``.NAME.HEX.tmp``) of ours
    that a killed process left behind; called by the holder of the rank's lock."""
    for p in directory.glob(".*.tmp"):
        if any(m in p.name for m in marks) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


class RankStore:
    """Rank ``layout.rank``'s files in ``partial/``: terms memmap, done-record and lock."""

    def __init__(self, partial: Path, layout: ChunkLayout, chunks: Sequence[np.ndarray],
                 T: int, D: int, K: int):
        self.partial, self.layout, self.chunks = partial, layout, chunks
        self.T, self.D, self.K = T, D, K
        partial.mkdir(parents=True, exist_ok=True)
        r = layout.rank
        self._lock = os.open(partial / f"rank{r}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock)
            raise FFEngineError(f"another process is working on {partial} as rank {r}; wait "
                                "for it to finish, or stop it first.") from e
        try:
            _remove_stale_temporaries(partial, (f"-rank{r}.",))
            if r == 0:
                _remove_stale_temporaries(partial.parent, tuple(f".{f}." for f in RESULT_FILES))
            self.log = DoneLog(partial / f"done-rank{r}.jsonl")
            owned = set(layout.owned)
            for t, j in self.log.done:
                if not (0 <= t < T and j in owned):
                    raise DataError(f"{self.log.path} records piece (checkpoint {t}, chunk "
                                    f"{j}), which is not rank {r}'s; the directory is "
                                    "damaged: delete it and trace again.")
            terms_path = partial / f"terms-rank{r}.npy"
            if self.log.done and not terms_path.exists():
                raise DataError(f"{self.log.path} records finished pieces but {terms_path} is "
                                "missing; delete the directory and trace again.")
            self.terms = _open_or_create(terms_path, (T, D, layout.n_local, K))
        except BaseException:
            self.close()
            raise

    def todo(self) -> dict[int, list[int]]:
        """{chunk: checkpoints still to score}, chunks in ascending order."""
        out = {}
        for j in self.layout.owned:
            ts = [t for t in range(self.T) if (t, j) not in self.log.done]
            if ts:
                out[j] = ts
        return out

    @property
    def n_pieces(self) -> int:
        return self.T * len(self.layout.owned)

    def write_piece(self, t: int, j: int, ids: np.ndarray, skipped: Sequence[tuple[int, str]],
                    terms: np.ndarray) -> None:
        """Store the (D, len(ids), K) terms of the decoded samples ``ids`` of chunk ``j`` for
        checkpoint ``t``; flush them to disk, then record the piece as done."""
        chunk = self.chunks[j]
        block = np.zeros((self.D, len(chunk), self.K), np.float32)
        if len(ids):
            block[:, np.flatnonzero(np.isin(chunk, ids))] = terms
        off = self.layout.offset(j)
        self.terms[t, :, off: off + len(chunk)] = block
        self.terms.flush()  # msync: the terms reach the disk before the record says so
        self.log.record(t, j, skipped)

    def _skipped_positions(self) -> np.ndarray:
        pos = []
        for (_, j), rec in self.log.done.items():
            if rec["skipped"]:
                ids = np.array([i for i, _ in rec["skipped"]], np.int64)
                pos.append(self.layout.offset(j) + np.flatnonzero(np.isin(self.chunks[j], ids)))
        return np.unique(np.concatenate(pos)) if pos else np.zeros(0, np.int64)

    def write_scores(self, aggregate: str, weights: np.ndarray | None = None,
                     combine: str = "mean") -> tuple[Path, Path]:
        """Aggregate this rank's terms into ``scores-rank{r}.npy`` (n_r, K) and
        ``detection-rank{r}.npy`` (n_r,); samples that could not be decoded score NaN.
        ``weights``: (T, K) checkpoint multipliers (``scoring.checkpoint_weights``);
        ``combine``: how the instances make the detection score (``scoring.detection_scores``)."""
        missing = self.n_pieces - len(self.log.done)
        if missing:
            raise FFEngineError(f"rank {self.layout.rank} has {missing} unscored pieces left.")
        r, n_r = self.layout.rank, self.layout.n_local
        bad = self._skipped_positions()
        sc_path = self.partial / f"scores-rank{r}.npy"
        det_path = self.partial / f"detection-rank{r}.npy"

        def score_blocks() -> Iterator[tuple[slice, np.ndarray]]:
            for a in range(0, n_r, _BLOCK):
                b = min(n_r, a + _BLOCK)
                s = aggregate_draws(np.asarray(self.terms[:, :, a:b]), aggregate, weights)
                s[bad[(bad >= a) & (bad < b)] - a] = np.nan
                yield slice(a, b), s

        _write_npy(sc_path, (n_r, self.K), score_blocks())
        sc = np.load(sc_path, mmap_mode="r")
        _write_npy(det_path, (n_r,), ((slice(a, min(n_r, a + _BLOCK)),
                                       detection_scores(sc[a: a + _BLOCK], combine))
                                      for a in range(0, n_r, _BLOCK)))
        del sc
        return sc_path, det_path

    def close(self) -> None:
        if getattr(self, "terms", None) is not None:
            self.terms.flush()
            self.terms = None
        if getattr(self, "log", None) is not None:
            self.log.close()
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None


# --------------------------------------------------------------------------------------
# the final, id-ordered arrays
# --------------------------------------------------------------------------------------
def assemble(out: Path, order: np.ndarray, chunk_size: int, world_size: int,
             T: int, D: int, K: int) -> None:
    """Gather every rank's partial files into ``terms.npy`` (T, D, n, K), ``scores.npy``
    (n, K) and ``detection_scores.npy`` (n,), indexed by sample id; each written atomically."""
    n = len(order)
    partial = out / PARTIAL_DIR
    layouts = [ChunkLayout(n, chunk_size, world_size, r) for r in range(world_size)]

    def pieces(kind: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, values) blocks over all ranks: values[..., i] belongs to sample ids[i]."""
        for lay in layouts:
            src = np.load(partial / f"{kind}-rank{lay.rank}.npy", mmap_mode="r")
            n_r = src.shape[-2] if kind == "terms" else src.shape[0]
            if n_r != lay.n_local:
                raise DataError(f"{partial}/{kind}-rank{lay.rank}.npy has {n_r} samples, "
                                f"expected {lay.n_local}; delete the directory and trace again.")
            for a in range(0, n_r, _BLOCK):
                b = min(n_r, a + _BLOCK)
                ids = order[lay.order_positions(a, b)]
                srt = np.argsort(ids, kind="stable")  # ascending ids: sequential writes
                vals = src[:, :, a:b] if kind == "terms" else src[a:b]
                yield ids[srt], np.take(np.asarray(vals), srt, axis=2 if kind == "terms" else 0)
            del src

    with atomic_path(out / "terms.npy") as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(T, D, n, K))
        for ids, vals in pieces("terms"):
            mm[:, :, ids] = vals
        mm.flush()
        del mm
    for kind, name, shape in (("scores", "scores.npy", (n, K)),
                              ("detection", "detection_scores.npy", (n,))):
        with atomic_path(out / name) as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            for ids, vals in pieces(kind):
                mm[ids] = vals
            mm.flush()
            del mm


def read_skipped(partial: Path, world_size: int) -> dict[int, str]:
    """{id: reason} of the undecodable samples, from every rank's done-record."""
    out: dict[int, str] = {}
    for r in range(world_size):
        out.update(DoneLog(partial / f"done-rank{r}.jsonl", writable=False).skipped())
    return out


def remove_partial(out: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(out / PARTIAL_DIR)
