"""Images of many sizes packed into one flat uint8 tensor, padded only in groups of similar
size: a chunk of a web-scale data set (one 4000×3000 photo among thumbnails) costs the sum of
its images' sizes, not batch × the largest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

# a padded group may always hold this many pixels (per channel), however much is padding
MIN_GROUP_PIXELS = 1 << 22
# beyond it, a group's padded pixels stay within this factor of its images' own pixels
MAX_PAD_FACTOR = 2.0


@dataclass(frozen=True)
class PackedImages:
    """``len(sizes)`` images, image k's (3, H, W) pixels at ``pixels[offsets[k]:]``.

    pixels: flat uint8 tensor (any device), shared by every selection of one batch;
    sizes: (B, 2) true (H, W); offsets: (B,) start of each image in ``pixels``;
    regular: every image stored in ``pixels`` has the same size, one after the other.
    """

    pixels: torch.Tensor
    sizes: np.ndarray
    offsets: np.ndarray
    regular: bool = False
    # padded_groups' result, kept: a scoring batch is augmented once per view and draw
    _groups: list = field(default_factory=list, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.sizes)

    def select(self, sel: np.ndarray) -> PackedImages:
        """Images ``sel`` (positions), sharing the pixels: no copy."""
        sel = np.asarray(sel, dtype=np.int64)
        return PackedImages(self.pixels, self.sizes[sel], self.offsets[sel], self.regular)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedImages:
        return PackedImages(self.pixels.to(device, non_blocking=non_blocking), self.sizes,
                            self.offsets, self.regular)

    def pin_memory(self) -> PackedImages:
        """Page-locked pixels (copy to a GPU faster; DataLoader(pin_memory=True) calls it)."""
        return PackedImages(self.pixels.pin_memory(), self.sizes, self.offsets, self.regular)

    def padded_groups(self) -> list[tuple[np.ndarray, torch.Tensor]]:
        """(positions, padded images) per :func:`pad_groups` group, computed once per object:
        one group, all in order, when the images share one size."""
        if not self._groups:
            self._groups.extend((g, self.padded(g)) for g in pad_groups(self.sizes))
        return self._groups

    def padded(self, sel: np.ndarray | None = None) -> torch.Tensor:
        """Images ``sel`` (default all), top-left aligned in a (len(sel), 3, Hmax, Wmax) uint8
        tensor on the pixels' device, Hmax and Wmax the largest of ``sel`` only. Images of one
        size in consecutive places come back as a view of ``pixels`` (no copy): read only."""
        imgs = self if sel is None else self.select(sel)
        dev = self.pixels.device
        if len(imgs) == 0:
            return torch.zeros((0, 3, 0, 0), dtype=torch.uint8, device=dev)
        if imgs.regular:
            h, w = (int(v) for v in imgs.sizes[0])
            rows = imgs.offsets // (3 * h * w)
            grid = self.pixels.view(-1, 3, h, w)
            if (np.diff(rows) == 1).all():  # consecutive images (a scoring batch): a view
                return grid[int(rows[0]): int(rows[-1]) + 1]
            return grid[torch.as_tensor(rows, device=dev)]
        hmax, wmax = (int(v) for v in imgs.sizes.max(0))
        out = torch.zeros((len(imgs), 3, hmax, wmax), dtype=torch.uint8, device=dev)
        places = zip(imgs.sizes.tolist(), imgs.offsets.tolist(), strict=True)
        for k, ((h, w), start) in enumerate(places):
            out[k, :, :h, :w] = self.pixels[start: start + 3 * h * w].view(3, h, w)
        return out


def pack_images(arrays: Sequence[np.ndarray]) -> PackedImages:
    """(H, W, 3) uint8 arrays -> :class:`PackedImages` on the CPU."""
    sizes = np.array([a.shape[:2] for a in arrays], dtype=np.int64).reshape(-1, 2)
    lengths = 3 * sizes.prod(1)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = torch.empty(int(offsets[-1]), dtype=torch.uint8)
    for a, start in zip(arrays, offsets[:-1].tolist(), strict=True):
        flat[start: start + a.size].view(3, a.shape[0], a.shape[1]).copy_(
            torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1))
    return _packed(flat, sizes, offsets[:-1])


def _packed(flat: torch.Tensor, sizes: np.ndarray, offsets: np.ndarray) -> PackedImages:
    """:class:`PackedImages` of ``flat`` pixels, ``regular`` when the sizes are all one."""
    regular = len(sizes) == 0 or bool((sizes == sizes[0]).all())
    return PackedImages(flat, sizes, offsets, regular)


def concat_packed(parts: Sequence[PackedImages], pin_memory: bool = False) -> PackedImages:
    """The images of ``parts`` (CPU), in order, as one :class:`PackedImages`: the same as
    packing them all at once. ``pin_memory``: the pixels in page-locked memory (copied
    there once, not packed and then pinned)."""
    if len(parts) == 1 and not pin_memory:
        return parts[0]
    total = sum(int(p.pixels.numel()) for p in parts)
    flat = torch.empty(total, dtype=torch.uint8, pin_memory=pin_memory)
    offsets, start = [], 0
    for p in parts:
        flat[start: start + p.pixels.numel()].copy_(p.pixels)
        offsets.append(p.offsets + start)
        start += int(p.pixels.numel())
    sizes = np.concatenate([p.sizes for p in parts]).reshape(-1, 2).astype(np.int64)
    return _packed(flat, sizes, np.concatenate(offsets).astype(np.int64))


def pad_groups(sizes: np.ndarray) -> list[np.ndarray]:
    """Positions 0..B-1 in groups to pad together: one group (in order) when every image
    has the same size; otherwise ordered by area, a group closing before its padded pixels
    (count × its largest H × its largest W) exceed both MIN_GROUP_PIXELS and MAX_PAD_FACTOR ×
    its images' own pixels."""
    B = len(sizes)
    if B == 0:
        return []
    if (sizes == sizes[0]).all():
        return [np.arange(B)]
    order = np.argsort(sizes[:, 0] * sizes[:, 1], kind="stable")
    groups, start, hmax, wmax, real = [], 0, 0, 0, 0
    for pos, k in enumerate(order):
        h, w = (int(v) for v in sizes[k])
        nh, nw, nreal = max(hmax, h), max(wmax, w), real + h * w
        padded = (pos - start + 1) * nh * nw
        if pos > start and padded > MIN_GROUP_PIXELS and padded > MAX_PAD_FACTOR * nreal:
            groups.append(order[start:pos])
            start, nh, nw, nreal = pos, h, w, h * w
        hmax, wmax, real = nh, nw, nreal
    groups.append(order[start:])
    return groups


# what augment_batch (and so every objective's score_batch) takes: padded or packed
Images = torch.Tensor | PackedImages
