"""SimCLR augmentations: counter-based uniforms, RandomResizedCrop boxes, batched views.

References: the SplitMix64 test vectors of its reference C implementation, a scalar
transcription of torchvision's ``RandomResizedCrop.get_params`` fed the same uniforms,
torchvision's functional colour ops, ``colorsys`` and plain numpy slices.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from ffengine.data import packed as packed_module
from ffengine.data.augment import (
    N_PARAMS,
    AugmentConfig,
    _hsv_to_rgb,
    _rgb_to_hsv,
    _splitmix64,
    augment_batch,
    counter_uniforms,
    crop_boxes,
    stream_id,
)
from ffengine.data.packed import pack_images, pad_groups

MASK = (1 << 64) - 1
IDENTITY = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)


def splitmix64_reference(state: int, count: int) -> list[int]:
    """Vigna's splitmix64.c ``next()``, in Python integers."""
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        out.append(z ^ (z >> 31))
    return out


def pad(arrays: list[np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
    """Top-left aligned zero-padded (B, 3, Hmax, Wmax) uint8 batch and (B, 2) sizes."""
    hmax = max(a.shape[0] for a in arrays)
    wmax = max(a.shape[1] for a in arrays)
    out = torch.zeros((len(arrays), 3, hmax, wmax), dtype=torch.uint8)
    for k, a in enumerate(arrays):
        out[k, :, : a.shape[0], : a.shape[1]] = torch.from_numpy(a).permute(2, 0, 1)
    return out, np.array([a.shape[:2] for a in arrays])


# --------------------------------------------------------------------------- uniforms


def test_splitmix64_matches_reference_vectors():
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423,
                4593380528125082431, 16408922859458223821]
    assert splitmix64_reference(1234567, 5) == expected
    golden = 0x9E3779B97F4A7C15
    states = np.array([(1234567 + k * golden) & MASK for k in range(5)], dtype=np.uint64)
    assert [int(v) for v in _splitmix64(states)] == expected


def test_counter_uniforms_range_and_resolution():
    ids = np.arange(3000)
    u = counter_uniforms(7, ids, stream=3)
    assert u.shape == (3000, N_PARAMS) and u.dtype == np.float64
    assert u.min() >= 0.0 and u.max() < 1.0
    scaled = u * 2.0**53
    np.testing.assert_array_equal(scaled, np.floor(scaled))  # 53-bit uniforms
    # roughly uniform, no two columns alike, neighbouring ids uncorrelated
    assert abs(u.mean() - 0.5) < 0.005
    assert abs(u.var() - 1 / 12) < 0.002
    for k in range(10):
        hist = np.histogram(u[:, k], bins=10, range=(0, 1))[0]
        assert hist.min() > 220 and hist.max() < 380
    c = np.corrcoef(u.T)
    assert np.abs(c - np.eye(N_PARAMS)).max() < 0.1
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.06


def test_counter_uniforms_independent_of_batch(np_rng):
    ids = np_rng.choice(10**6, size=64, replace=False)
    full = counter_uniforms(11, ids, stream=5)
    again = counter_uniforms(11, ids.copy(), stream=5)
    np.testing.assert_array_equal(full, again)
    perm = np_rng.permutation(64)
    np.testing.assert_array_equal(counter_uniforms(11, ids[perm], 5), full[perm])
    sub = counter_uniforms(11, ids[10:13], 5)
    np.testing.assert_array_equal(sub, full[10:13])
    single = counter_uniforms(11, ids[[40]], 5)
    np.testing.assert_array_equal(single[0], full[40])
    dup = counter_uniforms(11, np.array([ids[3], ids[3]]), 5)
    np.testing.assert_array_equal(dup[0], dup[1])
    # the first columns do not depend on how many are drawn
    np.testing.assert_array_equal(counter_uniforms(11, ids, 5, n=8), full[:, :8])


def test_counter_uniforms_differ_by_stream_seed_and_id():
    ids = np.arange(500)
    base = counter_uniforms(1, ids, stream=0)
    for other in (counter_uniforms(1, ids, stream=1), counter_uniforms(2, ids, stream=0),
                  counter_uniforms(1, ids + 500, stream=0),
                  counter_uniforms(1, ids, stream=stream_id(0, 1))):
        assert np.mean(other == base) < 1e-3
    assert len(np.unique(base)) == base.size
    big = counter_uniforms(1, np.array([2**40, 2**62 + 3]), stream=2**63 + 5)
    assert big.min() >= 0 and big.max() < 1


def test_stream_id():
    assert stream_id(1, 2, 3) == stream_id(1, 2, 3)
    ids = {stream_id(*p) for p in [(1, 2, 3), (1, 3, 2), (3, 2, 1), (1, 2), (1, 2, 3, 0), (0,)]}
    assert len(ids) == 6
    assert all(0 <= s < 2**64 for s in ids)


# --------------------------------------------------------------------------- crop boxes


def reference_crop(u: np.ndarray, height: int, width: int, cfg: AugmentConfig):
    """torchvision RandomResizedCrop.get_params with the draws taken from ``u``; (box, tried)."""
    area = height * width
    log_ratio = (math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    for t in range(10):
        ua, ur, ui, uj = u[4 * t: 4 * t + 4]
        target_area = area * (cfg.scale[0] + ua * (cfg.scale[1] - cfg.scale[0]))
        aspect = math.exp(log_ratio[0] + ur * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(math.floor(ui * (height - h + 1)))
            j = int(math.floor(uj * (width - w + 1)))
            return (j, i, j + w, i + h), True
    in_ratio = width / height
    if in_ratio < min(cfg.ratio):
        w = width
        h = int(round(w / min(cfg.ratio)))
    elif in_ratio > max(cfg.ratio):
        h = height
        w = int(round(h * max(cfg.ratio)))
    else:
        w, h = width, height
    i = (height - h) // 2
    j = (width - w) // 2
    return (j, i, j + w, i + h), False


@pytest.mark.parametrize("cfg", [
    AugmentConfig(),
    AugmentConfig(scale=(0.08, 1.0)),
    AugmentConfig(scale=(0.5, 0.9), ratio=(0.5, 2.0)),
])
def test_crop_boxes_match_torchvision_semantics(np_rng, cfg):
    n = 400
    heights = np_rng.integers(1, 70, n).astype(np.float64)
    widths = np_rng.integers(1, 70, n).astype(np.float64)
    heights[:20], widths[:20] = 4, 100  # extreme shapes: the centre-crop fallback
    heights[20:40], widths[20:40] = 100, 3
    u = counter_uniforms(3, np.arange(n), 9)
    boxes = crop_boxes(u, heights, widths, cfg)
    assert boxes.shape == (n, 4)
    n_fallback = 0
    for k in range(n):
        H, W = int(heights[k]), int(widths[k])
        x0, y0, x1, y1 = boxes[k]
        assert boxes[k].tolist() == [float(int(v)) for v in boxes[k]]  # whole pixels
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H, (k, H, W, boxes[k])
        expected, tried = reference_crop(u[k], H, W, cfg)
        assert tuple(boxes[k]) == expected, (k, H, W)
        w, h = x1 - x0, y1 - y0
        if tried:  # area and aspect within the configured ranges, up to rounding to pixels
            slack = (w + h) / 2 + 0.25
            assert cfg.scale[0] * H * W - slack <= w * h <= cfg.scale[1] * H * W + slack
            assert (w + 0.5) / max(h - 0.5, 1e-9) >= cfg.ratio[0]
            assert (w - 0.5) / (h + 0.5) <= cfg.ratio[1]
        else:
            n_fallback += 1
            assert x0 == (W - w) // 2 and y0 == (H - h) // 2  # centred
            assert w == W or h == H
    assert n_fallback >= 40


def test_crop_boxes_fallback_by_hand():
    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    u = counter_uniforms(0, np.arange(3), 0)
    boxes = crop_boxes(u, np.array([32.0, 20.0, 30.0]), np.array([32.0, 30.0, 20.0]), cfg)
    np.testing.assert_array_equal(boxes[0], [0, 0, 32, 32])  # the whole image
    np.testing.assert_array_equal(boxes[1], [5, 0, 25, 20])  # centred 20x20 of 20x30
    np.testing.assert_array_equal(boxes[2], [0, 5, 20, 25])  # centred 20x20 of 30x20
    ratio2 = AugmentConfig(scale=(1.0, 1.0), ratio=(2.0, 2.0))
    np.testing.assert_array_equal(crop_boxes(u[:1], np.array([32.0]), np.array([32.0]), ratio2),
                                  [[0, 8, 32, 24]])  # w = 32, h = round(32 / 2) = 16


# --------------------------------------------------------------------------- views


@pytest.fixture
def batch(np_rng):
    shapes = [(32, 32), (32, 64), (64, 32), (20, 27), (32, 32), (45, 13), (32, 32), (9, 50)]
    arrays = [np_rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    images, sizes = pad(arrays)
    ids = np_rng.choice(10**5, size=len(arrays), replace=False)
    return arrays, images, sizes, ids


def test_augment_batch_shape_dtype_range(batch):
    _, images, sizes, ids = batch
    for size in (32, 24):
        out = augment_batch(images, sizes, ids, 1, 2, AugmentConfig(size=size))
        assert out.shape == (len(ids), 3, size, size) and out.dtype == torch.float32
        assert out.is_contiguous() and torch.isfinite(out).all()
        assert out.min() >= 0 and out.max() <= 1
    again = augment_batch(images, torch.from_numpy(sizes), ids, 1, 2, AugmentConfig(size=24))
    assert torch.equal(out, again)
    other = augment_batch(images, sizes, ids, 1, 3, AugmentConfig(size=24))
    assert not torch.allclose(out, other)


def test_augment_batch_uint8_and_float_inputs_agree(batch):
    _, images, sizes, ids = batch
    a = augment_batch(images, sizes, ids, 4, 0, AugmentConfig())
    b = augment_batch(images.double() / 255, sizes, ids, 4, 0, AugmentConfig())
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_augment_batch_order_independent(batch, np_rng):
    _, images, sizes, ids = batch
    cfg = AugmentConfig()
    out = augment_batch(images, sizes, ids, 5, 1, cfg)
    perm = np_rng.permutation(len(ids))
    permuted = augment_batch(images[perm], sizes[perm], ids[perm], 5, 1, cfg)
    torch.testing.assert_close(permuted, out[perm], atol=1e-6, rtol=0)


def test_augment_batch_independent_of_batch_composition(batch):
    """A view is the same alone (unpadded) or padded among larger images."""
    arrays, images, sizes, ids = batch
    cfg = AugmentConfig()
    for seed in range(6):
        together = augment_batch(images, sizes, ids, seed, 7, cfg)
        for k, a in enumerate(arrays):
            alone_images, alone_sizes = pad([a])
            alone = augment_batch(alone_images, alone_sizes, ids[k: k + 1], seed, 7, cfg)
            torch.testing.assert_close(alone[0], together[k], atol=1e-6, rtol=0)



@pytest.mark.parametrize("min_pixels", [1, 1500, 1 << 22])
def test_augment_packed_images_equals_padded(batch, monkeypatch, min_pixels):
    """Packed images, padded in groups of similar size (several groups with a small
    min_pixels, one with the default), give the views of the padded batch."""
    monkeypatch.setattr(packed_module, "MIN_GROUP_PIXELS", min_pixels)
    arrays, images, sizes, ids = batch
    packed = pack_images(arrays)
    n_groups = len(pad_groups(packed.sizes))
    assert (n_groups == 1) == (min_pixels == 1 << 22)
    for seed, cfg in [(0, AugmentConfig()), (3, AugmentConfig(size=24, scale=(0.5, 1.0)))]:
        want = augment_batch(images, sizes, ids, seed, 7, cfg)
        got = augment_batch(packed, packed.sizes, ids, seed, 7, cfg)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        sel = np.array([6, 1, 3])
        torch.testing.assert_close(augment_batch(packed.select(sel), sizes[sel], ids[sel],
                                                 seed, 7, cfg), want[sel], atol=1e-6, rtol=0)
        # ids as a list, as the padded path takes them
        torch.testing.assert_close(augment_batch(packed, packed.sizes, ids.tolist(), seed, 7,
                                                 cfg), want, atol=1e-6, rtol=0)
    assert packed.padded_groups() is packed.padded_groups()  # padded once, kept
    with pytest.raises(ValueError, match="own sizes"):
        augment_batch(packed, sizes[::-1], ids, 0, 7, AugmentConfig())

def test_identity_view(batch):
    arrays, images, sizes, ids = batch
    out = augment_batch(images, sizes, ids, 0, 0, AugmentConfig(size=32, **IDENTITY))
    for k, a in enumerate(arrays):
        if a.shape[:2] == (32, 32):
            expected = torch.from_numpy(a.astype(np.float64) / 255).permute(2, 0, 1).float()
            torch.testing.assert_close(out[k], expected, atol=1e-5, rtol=0)
    flipped = augment_batch(images, sizes, ids, 0, 0,
                            AugmentConfig(size=32, **{**IDENTITY, "flip_p": 1.0}))
    for k, a in enumerate(arrays):
        if a.shape[:2] == (32, 32):
            expected = torch.from_numpy(a[:, ::-1].astype(np.float64) / 255).permute(2, 0, 1)
            torch.testing.assert_close(flipped[k], expected.float(), atol=1e-5, rtol=0)


def test_downscale_is_area_average(np_rng):
    """A whole 64x64 image viewed at 32x32 is its 2x2 block average."""
    a = np_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    images, sizes = pad([a])
    out = augment_batch(images, sizes, np.array([0]), 0, 0, AugmentConfig(size=32, **IDENTITY))
    expected = a.astype(np.float64).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3)) / 255
    torch.testing.assert_close(out[0], torch.from_numpy(expected).permute(2, 0, 1).float(),
                               atol=1e-5, rtol=0)


def test_grayscale(batch):
    arrays, images, sizes, ids = batch
    out = augment_batch(images, sizes, ids, 3, 3,
                        AugmentConfig(size=32, **{**IDENTITY, "gray_p": 1.0}))
    torch.testing.assert_close(out[:, 0], out[:, 1], atol=0, rtol=0)
    torch.testing.assert_close(out[:, 0], out[:, 2], atol=0, rtol=0)
    a = arrays[0].astype(np.float64) / 255
    luma = 0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]
    torch.testing.assert_close(out[0, 0], torch.from_numpy(luma).float(), atol=1e-5, rtol=0)
    # with gray_p = 0.5 about half the views are gray
    many = np.arange(400)
    img = torch.from_numpy(arrays[0]).permute(2, 0, 1)[None].expand(400, -1, -1, -1)
    half = augment_batch(img, np.tile([32, 32], (400, 1)), many, 3, 3,
                         AugmentConfig(size=8, **{**IDENTITY, "gray_p": 0.5}))
    n_gray = int(((half[:, 0] == half[:, 1]) & (half[:, 1] == half[:, 2])).all(-1).all(-1).sum())
    assert 150 < n_gray < 250


def test_colour_jitter_matches_torchvision(np_rng):
    """Brightness, contrast, saturation, hue in that order, as torchvision's functional ops."""
    arrays = [np_rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(12)]
    images, sizes = pad(arrays)
    ids = np.arange(100, 112)
    cfg = AugmentConfig(size=32, **{**IDENTITY, "jitter_p": 1.0,
                                    "jitter": (0.4, 0.4, 0.4, 0.1)})
    out = augment_batch(images, sizes, ids, 8, 2, cfg)
    u = counter_uniforms(8, ids, 2)
    # factor columns: 40 flip, 41 jitter gate, 42..45 brightness, contrast, saturation, hue
    for k in range(len(ids)):
        x = images[k].double() / 255
        x = TF.adjust_brightness(x, 0.6 + 0.8 * u[k, 42])
        x = TF.adjust_contrast(x, 0.6 + 0.8 * u[k, 43])
        x = TF.adjust_saturation(x, 0.6 + 0.8 * u[k, 44])
        x = TF.adjust_hue(x, (2 * u[k, 45] - 1) * 0.1)
        # torchvision's grayscale weighs red 0.2989 instead of 0.299
        torch.testing.assert_close(out[k].double(), x, atol=2e-3, rtol=0)


def test_jitter_probability(np_rng):
    a = np_rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    n = 400
    img = torch.from_numpy(a).permute(2, 0, 1)[None].expand(n, -1, -1, -1)
    cfg = AugmentConfig(size=32, **{**IDENTITY, "jitter_p": 0.8})
    out = augment_batch(img, np.tile([32, 32], (n, 1)), np.arange(n), 1, 1, cfg)
    plain = torch.from_numpy(a).permute(2, 0, 1).float() / 255
    unchanged = int(((out - plain).abs().amax(dim=(1, 2, 3)) < 1e-5).sum())
    assert 50 < unchanged < 110  # about 20 % of the views are not jittered


# --------------------------------------------------------------------------- HSV


def test_hsv_round_trip(rng):
    x = torch.rand((4, 3, 9, 7), generator=rng, dtype=torch.float64)
    x[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)  # gray
    x[0, :, 0, 1] = 0.0  # black
    x[0, :, 0, 2] = 1.0  # white
    x[0, :, 0, 3] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    x[0, :, 0, 4] = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    back = _hsv_to_rgb(_rgb_to_hsv(x))
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)
    xf = x.float()
    torch.testing.assert_close(_hsv_to_rgb(_rgb_to_hsv(xf)), xf, atol=1e-5, rtol=0)


def test_hsv_matches_colorsys(rng):
    x = torch.rand((2, 3, 5, 6), generator=rng, dtype=torch.float64)
    x[1, :, 4, 5] = 0.25  # gray: hue 0 by convention
    x[1, :, 4, 4] = torch.tensor([0.2, 0.9, 0.2], dtype=torch.float64)
    x[1, :, 4, 3] = torch.tensor([0.9, 0.1, 0.9], dtype=torch.float64)
    hsv = _rgb_to_hsv(x)
    assert hsv.shape == x.shape
    for b, i, j in [(0, 0, 0), (0, 2, 3), (1, 1, 5), (1, 4, 5), (1, 4, 4), (1, 4, 3), (0, 4, 1)]:
        rgb = [float(v) for v in x[b, :, i, j]]
        h, s, v = colorsys.rgb_to_hsv(*rgb)
        got = [float(t) for t in hsv[b, :, i, j]]
        dh = abs(got[0] - h)
        assert min(dh, 1 - dh) < 1e-6 and abs(got[1] - s) < 1e-6 and abs(got[2] - v) < 1e-6
        back = colorsys.hsv_to_rgb(*got)
        new = _hsv_to_rgb(torch.tensor(got, dtype=torch.float64).view(1, 3, 1, 1))
        np.testing.assert_allclose(new.view(3).numpy(), back, atol=1e-6)
    assert bool((hsv[:, 0] >= 0).all() and (hsv[:, 0] < 1).all())


def test_augment_config_round_trip():
    cfg = AugmentConfig(size=24, scale=(0.3, 0.9), ratio=(0.5, 2.0), flip_p=0.1,
                        jitter=(0.1, 0.2, 0.3, 0.05), jitter_p=0.7, gray_p=0.4)
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg


def test_hsv_to_rgb_equals_torchvisions_bit_for_bit(rng):
    """The sector pick is a gather where torchvision uses a one-hot einsum: the same values
    bit for bit (zeros compare equal whatever their sign), sector edges, grays, black and
    white included."""
    from torchvision.transforms import _functional_tensor as tvf

    x = torch.rand((64, 3, 11, 13), generator=rng)
    x[:16] = (x[:16] * 4).round() / 4  # hues on the sectors' edges, zeros and ones
    x[16:24, 1] = x[16:24, 0]  # ties between channels
    x[24:32] = x[24:32, :1]  # grays
    hsv = _rgb_to_hsv(x)
    want, got = tvf._hsv2rgb(hsv), _hsv_to_rgb(hsv)
    assert torch.equal(got, want)
    nonzero = want != 0
    assert torch.equal(got[nonzero].view(torch.int32), want[nonzero].view(torch.int32))
