"""SimCLR augmentations, batched and reproducible per sample.

Every random parameter of a view is a pure function of ``(seed, sample id, stream)``
through a counter-based hash (SplitMix64), so a sample's views are the same whatever batch
it lands in, on any device and in any process (DESIGN.md §2: augmentations drawn from a
seed derived from (sample id, checkpoint, draw)). The pixel work runs batched on the
images' device: RandomResizedCrop as ``roi_align`` (area-averaging on down-scaling),
horizontal flip, colour jitter (brightness, contrast, saturation, hue, in that fixed order,
applied with probability ``jitter_p``) and grayscale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision.ops import roi_align

from .packed import Images, PackedImages

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
N_PARAMS = 48  # uniforms drawn per view: 10 crop attempts x 4, flip, 4 jitter, 2 gates, ...
# colour_ops' uniforms: flip, jitter gate, brightness, contrast, saturation, hue, grayscale
# (columns 0..39 belong to the crop attempts)
COLOUR_COLUMNS = slice(40, 47)
# runs colour_ops: (views, uniforms, config) -> views
ColourOps = Callable[[torch.Tensor, torch.Tensor, "AugmentConfig"], torch.Tensor]


@dataclass(frozen=True)
class AugmentConfig:
    size: int = 32
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        return cls(size=int(d["size"]), scale=tuple(d["scale"]), ratio=tuple(d["ratio"]),
                   flip_p=float(d["flip_p"]), jitter=tuple(d["jitter"]),
                   jitter_p=float(d["jitter_p"]), gray_p=float(d["gray_p"]))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def stream_id(*parts: int) -> int:
    """Fold small integers (purpose, epoch or checkpoint, draw, view) into one stream id."""
    h = np.array([0x243F6A8885A308D3], dtype=np.uint64)
    for p in parts:
        h = _splitmix64(h ^ np.array([p & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return int(h[0])


def counter_uniforms(seed: int, ids: np.ndarray, stream: int, n: int = N_PARAMS) -> np.ndarray:
    """(B, n) float64 uniforms in [0, 1), a pure function of (seed, id, stream, column)."""
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    base = _splitmix64(_splitmix64(np.full_like(ids, seed & 0xFFFFFFFFFFFFFFFF)
                                   ^ np.uint64(stream)) ^ ids)
    cols = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(base[:, None] * np.uint64(0x9E3779B97F4A7C15) + cols[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def crop_boxes(u: np.ndarray, heights: np.ndarray, widths: np.ndarray,
               cfg: AugmentConfig) -> np.ndarray:
    """RandomResizedCrop parameters as torchvision draws them (10 tries, then a centre crop
    clamped to the allowed ratios), vectorized. Returns (B, 4) boxes x0, y0, x1, y1."""
    B = len(heights)
    area = (heights * widths).astype(np.float64)
    log_r = (math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    boxes = np.zeros((B, 4))
    done = np.zeros(B, dtype=bool)
    for t in range(10):
        ua, ur, ui, uj = (u[:, 4 * t + k] for k in range(4))
        target = area * (cfg.scale[0] + ua * (cfg.scale[1] - cfg.scale[0]))
        ar = np.exp(log_r[0] + ur * (log_r[1] - log_r[0]))
        w = np.round(np.sqrt(target * ar))
        h = np.round(np.sqrt(target / ar))
        ok = (~done) & (w > 0) & (h > 0) & (w <= widths) & (h <= heights)
        i = np.floor(ui * (heights - h + 1))
        j = np.floor(uj * (widths - w + 1))
        boxes[ok] = np.stack([j, i, j + w, i + h], axis=1)[ok]
        done |= ok
    if not done.all():  # centre crop, as torchvision's fallback
        rest = ~done
        in_ratio = widths[rest] / heights[rest]
        w = np.where(in_ratio < cfg.ratio[0], widths[rest],
                     np.where(in_ratio > cfg.ratio[1],
                              np.round(heights[rest] * cfg.ratio[1]), widths[rest]))
        h = np.where(in_ratio < cfg.ratio[0], np.round(widths[rest] / cfg.ratio[0]),
                     heights[rest])
        i = (heights[rest] - h) // 2
        j = (widths[rest] - w) // 2
        boxes[rest] = np.stack([j, i, j + w, i + h], axis=1)
    return boxes


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    # each channel takes one of (v, q, p, t) by the hue's sector i: torchvision's one-hot
    # einsum, as a gather (the same values, bit for bit, up to the sign of a zero; the
    # einsum was a third of the augmentation's time, 2026-12-04)
    a1 = torch.stack((v, q, p, p, t, v), 1)
    a2 = torch.stack((t, v, v, q, p, p), 1)
    a3 = torch.stack((p, p, t, v, v, q), 1)
    a4 = torch.stack((a1, a2, a3), 1)  # (B, 3, 6, H, W)
    sector = i[:, None, None].expand(-1, 3, 1, -1, -1)
    return a4.gather(2, sector).squeeze(2)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on ``device`` without waiting for the device: a blocking copy to
    a GPU first drains every kernel queued before it, so the host could not queue a batch's
    next kernels while the GPU runs its last ones. A copy from pageable memory is staged
    before the call returns, so ``a`` may be freed at once."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)


def _replicate_pad(x: torch.Tensor, sizes: np.ndarray) -> torch.Tensor:
    """Fill each slot beyond its image's true (H, W) with the image's edge pixels, so that
    bilinear sampling at the bottom and right borders reads the image's own edge (as for an
    unpadded image) and never the zeros of the padding: a view does not depend on the
    sizes of the other images in its batch."""
    B, C, H, W = x.shape
    if (sizes[:, 0] == H).all() and (sizes[:, 1] == W).all():
        return x
    dev = x.device
    h, w = (_to_device(sizes[:, k].astype(np.int64), dev) for k in (0, 1))
    ys = torch.minimum(torch.arange(H, device=dev)[None], (h - 1)[:, None])  # (B, H)
    xs = torch.minimum(torch.arange(W, device=dev)[None], (w - 1)[:, None])  # (B, W)
    x = x.gather(2, ys[:, None, :, None].expand(B, C, H, W))
    return x.gather(3, xs[:, None, None, :].expand(B, C, H, W))


def augment_batch(images: Images, sizes: torch.Tensor | np.ndarray,
                  ids: np.ndarray, seed: int, stream: int, cfg: AugmentConfig,
                  colour: ColourOps | None = None) -> torch.Tensor:
    """One view of each image.

    images: (B, 3, Hmax, Wmax) uint8 or float in [0, 1], each image top-left aligned in its
    padded slot, or :class:`PackedImages` (padded here in groups of similar size: a view does
    not depend on the other images of its batch); sizes: (B, 2) true (H, W); ids: (B,)
    sample ids. ``colour``: what runs :func:`colour_ops` (default: it, eagerly; the Engine
    may pass a compiled one, equal to rounding). Returns (B, 3, size, size) float32 in
    [0, 1] on the images' device.
    """
    sizes = np.asarray(sizes.cpu() if isinstance(sizes, torch.Tensor) else sizes)
    ids = np.asarray(ids)
    if isinstance(images, PackedImages):
        if not np.array_equal(sizes, images.sizes):
            raise ValueError("sizes must be the packed images' own sizes, in their order")
        groups = images.padded_groups()
        if len(groups) == 1 and (groups[0][0] == np.arange(len(ids))).all():
            images = groups[0][1]  # one group in order: no scatter
        else:
            out = torch.empty((len(ids), 3, cfg.size, cfg.size), dtype=torch.float32,
                              device=images.pixels.device)
            for g, padded in groups:
                out[_to_device(np.asarray(g, dtype=np.int64), out.device)] = augment_batch(
                    padded, sizes[g], ids[g], seed, stream, cfg, colour)
            return out
    u = counter_uniforms(seed, ids, stream)
    B = len(ids)
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    dev = x.device
    x = _replicate_pad(x, sizes)
    boxes = crop_boxes(u, sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64), cfg)
    rois = _to_device(np.concatenate([np.arange(B)[:, None], boxes], 1).astype(np.float32), dev)
    x = roi_align(x, rois, output_size=cfg.size, spatial_scale=1.0, sampling_ratio=0,
                  aligned=True)
    u_colour = _to_device(u[:, COLOUR_COLUMNS].astype(np.float32), dev)
    return (colour or colour_ops)(x, u_colour, cfg)


def colour_ops(x: torch.Tensor, u: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Flip, colour jitter and grayscale of cropped views ``x`` (B, 3, size, size), driven by
    ``u`` (B, 7): the view's uniforms of :data:`COLOUR_COLUMNS`, as float32. Elementwise
    but for one mean per view, so a view never depends on the others of its batch."""
    B = x.shape[0]

    def uni(k: int) -> torch.Tensor:
        return u[:, k].view(B, 1, 1, 1)

    flip = uni(0) < cfg.flip_p
    x = torch.where(flip, x.flip(-1), x)
    bj, cj, sj, hj = cfg.jitter
    jit = uni(1) < cfg.jitter_p
    bf = 1 - bj + 2 * bj * uni(2)
    cf = 1 - cj + 2 * cj * uni(3)
    sf = 1 - sj + 2 * sj * uni(4)
    hf = (2 * uni(5) - 1) * hj
    y = (x * bf).clamp(0, 1)
    m = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - m) * cf + m).clamp(0, 1)
    g = _gray(y)
    y = ((y - g) * sf + g).clamp(0, 1)
    if hj > 0:
        hsv = _rgb_to_hsv(y)
        hsv = torch.stack((torch.remainder(hsv[:, 0] + hf[:, 0], 1.0), hsv[:, 1], hsv[:, 2]), 1)
        y = _hsv_to_rgb(hsv)
    x = torch.where(jit, y, x)
    gray = uni(6) < cfg.gray_p
    x = torch.where(gray, _gray(x).expand(-1, 3, -1, -1), x)
    return x.contiguous()
