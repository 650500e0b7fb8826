"""Decode index samples into packed uint8 batches, skipping (and reporting) corrupt images."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DataError
from .index import FLAG_CORRUPT, SampleIndex, ShardReadError
from .packed import PackedImages, concat_packed, pack_images

# samples per decoding task with worker processes: a chunk (4,096 samples by default) is
# decoded by several workers at once and put back together in order, so the first chunk is
# ready after one part's decoding, not a whole chunk's (0.6 s on an H200 host, where the
# engine then waited 0.63 s of a 1.54 s pass), and few chunks still use every worker
DECODE_PART = 512


@dataclass
class DecodedBatch:
    """Decoded images, packed (:class:`PackedImages`: their sizes add up, a chunk never
    costs batch × its largest image).

    ids: (B,) sample ids of the decoded images, in ``packed``'s order;
    skipped: (id, reason) of the requested samples that could not be decoded.
    """

    packed: PackedImages
    ids: np.ndarray
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def sizes(self) -> np.ndarray:
        """(B, 2) true (H, W) of each image."""
        return self.packed.sizes

    @property
    def images(self) -> torch.Tensor:
        """Every image padded to the largest, (B, 3, Hmax, Wmax) uint8: for small, uniform
        data sets (pre-training, the demo, tests); scoring keeps chunks packed."""
        return self.packed.padded()

    def pin_memory(self) -> DecodedBatch:
        """Called by DataLoader(pin_memory=True): page-locked pixels copy to a GPU faster."""
        return DecodedBatch(self.packed.pin_memory(), self.ids, self.skipped)


def pad_images(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
    """(H, W, 3) uint8 arrays -> (B, 3, Hmax, Wmax) uint8 tensor and (B, 2) sizes (for a few
    images, e.g. backdoor instances; a data set's chunks stay packed)."""
    packed = pack_images(arrays)
    return packed.padded(), packed.sizes


def decode_ids(index: SampleIndex, ids: Sequence[int], captions: bool = False,
               skip_unreadable: bool = False) -> DecodedBatch:
    """Decode ``ids``; a sample that cannot be decoded (or, with ``captions``, has no readable
    caption) is skipped with its reason. A shard that cannot be read raises ShardReadError,
    unless ``skip_unreadable`` (for a shard lost for good): then its samples are skipped."""
    arrays, good, skipped = [], [], []
    flags = np.asarray(index.records["flags"])
    for i in ids:
        i = int(i)
        if flags[i] & FLAG_CORRUPT:
            skipped.append((i, "flagged corrupt when indexed"))
            continue
        try:
            if captions and index.caption(i) is None:
                skipped.append((i, f"sample {i} ({index.key(i)}) has no caption (KEY.txt)"))
                continue
            arrays.append(index.image(i))
            good.append(i)
        except ShardReadError as e:
            if not skip_unreadable:
                raise  # the shard, not the sample: stop, so a resume retries it once restored
            skipped.append((i, str(e)))
        except DataError as e:
            skipped.append((i, str(e)))
    return DecodedBatch(pack_images(arrays), np.asarray(good, dtype=np.int64), skipped)


def merge_batches(parts: Sequence[DecodedBatch], pin_memory: bool = False) -> DecodedBatch:
    """The decoded parts of one chunk, in order, as the chunk's batch: the same as decoding
    the chunk at once (``pin_memory``: its pixels page-locked)."""
    return DecodedBatch(concat_packed([b.packed for b in parts], pin_memory),
                        np.concatenate([b.ids for b in parts]).astype(np.int64),
                        [s for b in parts for s in b.skipped])


class _PartDataset(torch.utils.data.Dataset):
    def __init__(self, index: SampleIndex, parts: Sequence[np.ndarray], captions: bool,
                 skip_unreadable: bool):
        self.index, self.parts = index, parts
        self.captions, self.skip_unreadable = captions, skip_unreadable

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, k: int) -> DecodedBatch:
        return decode_ids(self.index, self.parts[k], self.captions, self.skip_unreadable)


def iter_decoded(index: SampleIndex, ids: np.ndarray, chunk: int, workers: int = 0,
                 pin_memory: bool = False) -> Iterator[DecodedBatch]:
    """Decode ``ids`` in order, ``chunk`` at a time; with ``workers`` > 0 decoding runs in
    worker processes, overlapping the caller's compute."""
    chunks = [ids[s: s + chunk] for s in range(0, len(ids), chunk)]
    return iter_chunks(index, chunks, workers=workers, pin_memory=pin_memory)


def iter_chunks(index: SampleIndex, chunks: Sequence[np.ndarray], workers: int = 0,
                pin_memory: bool = False, captions: bool = False,
                skip_unreadable: bool = False) -> Iterator[DecodedBatch]:
    """Decode each array of ids in ``chunks`` into one batch, in order (see
    :func:`iter_decoded`; ``captions`` and ``skip_unreadable`` as in :func:`decode_ids`).
    With ``workers``, each chunk is decoded in parts of :data:`DECODE_PART` samples by
    several workers and put back together; the workers start at this call, so they decode
    while the caller prepares (loads checkpoints, takes the cosine gradients)."""
    chunks = [np.asarray(c) for c in chunks]
    if workers == 0:
        parts_of = [1] * len(chunks)
        parts = chunks
    else:
        parts_of = [max(1, -(-len(c) // DECODE_PART)) for c in chunks]
        parts = [p for c, k in zip(chunks, parts_of, strict=True) for p in np.array_split(c, k)]
    loader = iter(torch.utils.data.DataLoader(
        _PartDataset(index, parts, captions, skip_unreadable), batch_size=None,
        shuffle=False, num_workers=workers, pin_memory=pin_memory and workers == 0,
        prefetch_factor=4 if workers > 0 else None, persistent_workers=False))
    return _whole_chunks(loader, parts_of, workers, pin_memory)


def _whole_chunks(loader: Iterator[DecodedBatch], parts_of: list[int], workers: int,
                  pin_memory: bool) -> Iterator[DecodedBatch]:
    for k in parts_of:
        done = [next(loader) for _ in range(k)]
        # parts come back as pageable memory; the merge copies them into page-locked memory
        # once (the loader would pin each part, then the merge copy again)
        yield done[0] if workers == 0 else merge_batches(done, pin_memory)


def decode_all(index: SampleIndex, ids: np.ndarray | None = None) -> DecodedBatch:
    """Every requested sample in one batch (small data sets: the demo, tests, pre-training)."""
    ids = np.arange(len(index)) if ids is None else np.asarray(ids)
    return decode_ids(index, ids)
