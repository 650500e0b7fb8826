"""The memory-mapped sample index: tar shards, the bundled demo splits, corrupt and truncated
data, the image-folder and array adapters, pickling and the batch loader.

Expectations are computed independently of ffengine: tar members are read with ``tarfile``,
images are decoded with PIL directly, pixels are compared with the arrays that were written.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ffengine.data import packed as packed_module
from ffengine.data.demo_data import demo_index
from ffengine.data.index import (
    PackedSample,
    SampleIndex,
    ShardReadError,
    build_index,
    index_arrays,
    index_image_folder,
    write_pack,
)
from ffengine.data.loader import decode_ids, iter_decoded
from ffengine.data.packed import pad_groups
from ffengine.data.shards import ShardWriter
from ffengine.errors import DataError

CIFAR_DIR = Path(__file__).resolve().parents[2].parent / "shared/data/cifar10"
REAL_SHARD = CIFAR_DIR / "test-000001.tar"
needs_cifar = pytest.mark.skipif(
    not REAL_SHARD.exists(),
    reason=f"the bundled CIFAR-10 shards are not at {CIFAR_DIR} (../shared/data/cifar10)")


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def pil_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def read_tar(path: Path) -> list[tuple[str, str, bytes]]:
    """(key, ext, bytes) of every file member, in file order, read with tarfile alone."""
    out = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            if m.isfile():
                key, _, ext = m.name.partition(".")
                out.append((key, ext, tar.extractfile(m).read()))
    return out


# --------------------------------------------------------------------------- real shard


@pytest.fixture(scope="module")
def real_tar() -> dict[str, dict[str, bytes]]:
    if not REAL_SHARD.exists():
        pytest.skip(f"the bundled CIFAR-10 shards are not at {CIFAR_DIR}")
    samples: dict[str, dict[str, bytes]] = {}
    for key, ext, data in read_tar(REAL_SHARD):
        samples.setdefault(key, {})[ext] = data
    return samples


@pytest.fixture(scope="module")
def real_index(tmp_path_factory) -> SampleIndex:
    if not REAL_SHARD.exists():
        pytest.skip(f"the bundled CIFAR-10 shards are not at {CIFAR_DIR}")
    return build_index([REAL_SHARD], tmp_path_factory.mktemp("real") / "index", verify=True)


@needs_cifar
def test_real_shard_keys_labels_and_bytes(real_index, real_tar, np_rng):
    assert len(real_index) == 5000
    assert real_index.metadata["n"] == 5000
    assert real_index.metadata["n_corrupt"] == 0
    assert len(real_index.corrupt) == 0
    # keys in file order, labels from KEY.cls, for every sample
    assert real_index.keys() == list(real_tar)
    expected_labels = np.array([int(real_tar[k]["cls"]) for k in real_tar])
    np.testing.assert_array_equal(real_index.labels, expected_labels)
    assert set(np.unique(real_index.labels)) == set(range(10))
    # no url in the CIFAR json, no caption member
    assert {real_index.domain_names[d] for d in real_index.domains} == {"unknown"}
    for i in np_rng.choice(5000, size=50, replace=False):
        i = int(i)
        key = real_index.key(i)
        assert real_index.image_bytes(i) == real_tar[key]["jpg"]
        assert real_index.labels[i] == int(real_tar[key]["cls"])
        assert real_index.caption(i) is None
        img = real_index.image(i)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, pil_decode(real_tar[key]["jpg"]))


@needs_cifar
def test_real_shard_random_access_is_order_independent(real_index, np_rng):
    ids = np_rng.choice(5000, size=200, replace=False)
    forward = {int(i): real_index.image_bytes(int(i)) for i in np.sort(ids)}
    shuffled = {int(i): real_index.image_bytes(int(i)) for i in ids}
    backward = {int(i): real_index.image_bytes(int(i)) for i in np.sort(ids)[::-1]}
    assert forward == shuffled == backward
    # a fresh view of the same directory reads the same bytes
    again = SampleIndex(real_index.path)
    assert all(again.image_bytes(i) == b for i, b in forward.items())
    again.close()


@needs_cifar
def test_real_shard_hash_is_stable(real_index, tmp_path):
    second = build_index([REAL_SHARD], tmp_path / "again", verify=True)
    assert second.hash == real_index.hash
    assert len(second.hash) == 64
    np.testing.assert_array_equal(np.asarray(second.records), np.asarray(real_index.records))


# --------------------------------------------------------------------------- synthetic shards


def write_bmp_shard(path: Path, images: list[np.ndarray]) -> None:
    with ShardWriter(path) as w:
        for i, img in enumerate(images):
            w.write(f"s_{i:03d}", {"bmp": encode(img, "BMP"), "cls": i % 10,
                                   "json": {"url": f"https://www.Site{i % 2}.example/{i}.bmp"},
                                   "txt": f"caption {i}"})


def test_synthetic_shard_round_trip(tmp_path, np_rng):
    images = [np_rng.integers(0, 256, (9 + i, 13 + 2 * i, 3), dtype=np.uint8) for i in range(6)]
    shard = tmp_path / "syn.tar"
    write_bmp_shard(shard, images)
    index = build_index([shard], tmp_path / "idx")
    assert len(index) == 6
    assert index.keys() == [f"s_{i:03d}" for i in range(6)]
    np.testing.assert_array_equal(index.labels, [i % 10 for i in range(6)])
    # domain: url host, lower case, without www.
    assert [index.domain_names[d] for d in index.domains] == [
        f"site{i % 2}.example" for i in range(6)]
    for i, img in enumerate(images):
        np.testing.assert_array_equal(index.image(i), img)
        assert index.caption(i) == f"caption {i}"
    members = {(k, e): b for k, e, b in read_tar(shard)}
    for i in range(6):
        assert index.image_bytes(i) == members[(f"s_{i:03d}", "bmp")]


def test_hash_changes_with_one_shard_byte_and_not_with_the_path(tmp_path, np_rng):
    images = [np_rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(4)]
    shard = tmp_path / "a" / "syn.tar"
    write_bmp_shard(shard, images)
    base = build_index([shard], tmp_path / "idx0")

    moved = tmp_path / "b" / "renamed.tar"
    moved.parent.mkdir()
    shutil.copyfile(shard, moved)
    assert build_index([moved], tmp_path / "idx1").hash == base.hash

    # flip one pixel byte inside the third image member (BMP: still decodes)
    with tarfile.open(shard) as tar:
        member = tar.getmember("s_002.bmp")
    data = bytearray(shard.read_bytes())
    pos = member.offset_data + member.size - 5
    data[pos] ^= 0xFF
    flipped = tmp_path / "c" / "syn.tar"
    flipped.parent.mkdir()
    flipped.write_bytes(bytes(data))
    changed = build_index([flipped], tmp_path / "idx2")
    assert len(changed.corrupt) == 0
    # same records (offsets, sizes, labels), different content
    np.testing.assert_array_equal(np.asarray(changed.records), np.asarray(base.records))
    assert changed.hash != base.hash
    assert not np.array_equal(changed.image(2), base.image(2))
    np.testing.assert_array_equal(changed.image(1), base.image(1))


# --------------------------------------------------------------------------- demo splits


@pytest.mark.parametrize(("split", "n", "source"), [
    ("train", 5000, "train-000000.tar"),
    ("aux", 2000, "train-000001.tar"),
    ("test", 1000, "test-000000.tar"),
])
def test_demo_split(split, n, source, np_rng):
    index = demo_index(split)
    assert len(index) == n
    assert len(index.corrupt) == 0
    assert set(np.unique(index.labels)) == set(range(10))
    assert len(set(index.keys())) == n
    for i in np_rng.choice(n, size=100, replace=False):
        img = index.image(int(i))
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    if not (CIFAR_DIR / source).exists():
        pytest.skip(f"original shard {CIFAR_DIR / source} absent; bytes not compared")
    with tarfile.open(CIFAR_DIR / source) as tar:
        for i in [0, 1, n // 2, n - 1]:
            key = index.key(i)
            assert tar.extractfile(f"{key}.jpg").read() == index.image_bytes(i)
            assert int(tar.extractfile(f"{key}.cls").read()) == index.labels[i]


def test_demo_splits_are_disjoint():
    keys = {s: set(demo_index(s).keys()) for s in ("train", "aux", "test")}
    assert not keys["train"] & keys["aux"]
    assert not keys["train"] & keys["test"]
    assert not keys["aux"] & keys["test"]


def test_demo_unknown_split():
    with pytest.raises(DataError, match="unknown demo split"):
        demo_index("validation")


# --------------------------------------------------------------------------- corrupt data


@pytest.fixture
def corrupt_shard(tmp_path, np_rng) -> tuple[Path, list[bytes]]:
    """5 JPEG samples: #1 truncated to half its bytes, #3 garbage."""
    jpgs = [encode(np_rng.integers(0, 256, (16, 20, 3), dtype=np.uint8), "JPEG")
            for _ in range(5)]
    jpgs[1] = jpgs[1][: len(jpgs[1]) // 2]
    jpgs[3] = b"this is not an image at all " * 8
    path = tmp_path / "corrupt.tar"
    with ShardWriter(path) as w:
        for i, data in enumerate(jpgs):
            w.write(f"c_{i}", {"jpg": data, "cls": i})
    return path, jpgs


def test_corrupt_images_are_flagged_and_skipped(corrupt_shard, tmp_path):
    path, jpgs = corrupt_shard
    with pytest.warns(UserWarning, match=r"2 corrupt image\(s\) flagged"):
        index = build_index([path], tmp_path / "idx", verify=True)
    assert len(index) == 5
    np.testing.assert_array_equal(index.corrupt, [1, 3])
    assert index.metadata["n_corrupt"] == 2

    batch = decode_ids(index, range(5))
    np.testing.assert_array_equal(batch.ids, [0, 2, 4])
    assert [i for i, _ in batch.skipped] == [1, 3]
    assert all(reason for _, reason in batch.skipped)
    assert batch.images.shape == (3, 3, 16, 20)
    np.testing.assert_array_equal(batch.sizes, [[16, 20]] * 3)
    for k, i in enumerate([0, 2, 4]):
        np.testing.assert_array_equal(batch.images[k].permute(1, 2, 0).numpy(),
                                      pil_decode(jpgs[i]))


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("RGB", "PNG"), ("L", "JPEG"),
                                       ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"),
                                       ("I;16", "PNG")])
def test_decode_image_is_pils_rgb_conversion_of_every_mode(mode, fmt, np_rng):
    from ffengine.data.index import decode_image

    img = Image.fromarray(np_rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    with Image.open(io.BytesIO(buf.getvalue())) as ref:
        want = np.array(ref.convert("RGB"))
    got = decode_image(buf.getvalue())
    assert got.dtype == np.uint8 and got.shape == (7, 11, 3) and got.flags.writeable
    np.testing.assert_array_equal(got, want)


def test_unverified_corrupt_images_are_skipped_on_decode(corrupt_shard, tmp_path):
    path, _ = corrupt_shard
    index = build_index([path], tmp_path / "idx", verify=False)  # no decode, no warning
    assert len(index.corrupt) == 0
    batch = decode_ids(index, [4, 3, 2, 1, 0])
    np.testing.assert_array_equal(batch.ids, [4, 2, 0])
    assert [i for i, _ in batch.skipped] == [3, 1]
    for i, reason in batch.skipped:
        assert "cannot decode" in reason and f"c_{i}" in reason
    with pytest.raises(DataError, match="c_3"):
        index.image(3)


def _cut_points(path: Path) -> dict[str, int]:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    third = members[len(members) // 2]
    return {
        "half": path.stat().st_size // 2,
        "inside-data": third.offset_data + max(1, third.size // 2),
        "inside-header": third.offset + 100,
        "at-header": third.offset,  # a block boundary: the tail is simply missing
    }


@pytest.mark.parametrize("where", ["half", "inside-data", "inside-header", "at-header"])
def test_truncated_tar_raises_data_error(tmp_path, np_rng, where):
    images = [np_rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(5)]
    full = tmp_path / "full.tar"
    write_bmp_shard(full, images)
    cut = _cut_points(full)[where]
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(full.read_bytes()[:cut])
    for verify in (True, False):
        with pytest.raises(DataError, match="cut.tar"):
            build_index([truncated], tmp_path / f"idx-{verify}", verify=verify)


def test_missing_shard_path_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="nowhere.tar"):
        build_index([tmp_path / "nowhere.tar"], tmp_path / "idx")


def test_shard_deleted_after_indexing(tmp_path, np_rng):
    images = [np_rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    shard = tmp_path / "gone.tar"
    write_bmp_shard(shard, images)
    path = build_index([shard], tmp_path / "idx").path
    shard.unlink()
    index = SampleIndex(path)
    assert len(index) == 3  # the index itself is intact
    with pytest.raises(DataError, match="gone.tar"):
        index.image(0)
    with pytest.raises(DataError, match="gone.tar"):
        index.image_bytes(1)
    # not the samples' fault: scoring stops (a resume retries), unless told the shard is lost
    with pytest.raises(ShardReadError, match="gone.tar"):
        decode_ids(index, [0, 1, 2])
    batch = decode_ids(index, [0, 1, 2], skip_unreadable=True)
    assert len(batch) == 0
    assert [i for i, _ in batch.skipped] == [0, 1, 2]
    assert all("gone.tar" in reason for _, reason in batch.skipped)


def test_shard_truncated_after_indexing(tmp_path, np_rng):
    images = [np_rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    shard = tmp_path / "short.tar"
    write_bmp_shard(shard, images)
    index = build_index([shard], tmp_path / "idx")
    index.close()
    with tarfile.open(shard) as tar:
        last = tar.getmember("s_002.bmp")
    shard.write_bytes(shard.read_bytes()[: last.offset_data + 10])
    index = SampleIndex(index.path)
    np.testing.assert_array_equal(index.image(0), images[0])
    with pytest.raises(DataError, match="short.tar.*truncated"):
        index.image_bytes(2)


def test_not_an_index(tmp_path):
    with pytest.raises(DataError, match="not a sample index"):
        SampleIndex(tmp_path)


# --------------------------------------------------------------------------- adapters


def test_index_image_folder(tmp_path, np_rng):
    root = tmp_path / "folder"
    images = {}
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for name in ("a", "b"):
            img = np_rng.integers(0, 256, (11, 7, 3), dtype=np.uint8)
            (root / cls / f"{name}.png").write_bytes(encode(img, "PNG"))
            images[f"{cls}/{name}"] = img
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "dogs" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"1 corrupt image\(s\).*broken\.png"):
        index = index_image_folder(root, tmp_path / "idx", domain="pets.example")
    assert index.keys() == ["cats/a", "cats/b", "dogs/a", "dogs/b", "dogs/broken"]
    np.testing.assert_array_equal(index.labels, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(index.corrupt, [4])
    assert {index.domain_names[d] for d in index.domains} == {"pets.example"}
    for i, key in enumerate(index.keys()[:4]):
        np.testing.assert_array_equal(index.image(i), images[key])
        assert index.caption(i) is None
    batch = decode_ids(index, range(5))
    np.testing.assert_array_equal(batch.ids, [0, 1, 2, 3])
    assert [i for i, _ in batch.skipped] == [4]


def test_index_image_folder_without_classes(tmp_path):
    with pytest.raises(DataError, match="no class sub-folders"):
        index_image_folder(tmp_path, tmp_path / "idx")


def test_index_arrays_round_trip(tmp_path, np_rng):
    shapes = [(5, 9), (32, 32), (17, 3), (1, 1), (12, 30)]
    images = [np_rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    labels = [3, -1, 0, 9, 3]
    captions = ["a red car", "", "caf\u00e9 \u2615", "x" * 300, "line\nbreak"]
    domains = ["a.example", "b.example", "a.example", "unknown", "c.example"]
    keys = [f"arr/{i}" for i in range(5)]
    index = index_arrays(images, tmp_path / "idx", labels=labels, keys=keys, domains=domains,
                         captions=captions)
    assert len(index) == 5
    assert index.keys() == keys
    np.testing.assert_array_equal(index.labels, labels)
    assert [index.domain_names[d] for d in index.domains] == domains
    for i, img in enumerate(images):
        np.testing.assert_array_equal(index.image(i), img)
        assert index.caption(i) == captions[i]
    # a stacked array works too, with default keys, labels and domains
    stacked = np_rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    plain = index_arrays(stacked, tmp_path / "idx2")
    assert plain.keys() == [f"{i:09d}" for i in range(4)]
    np.testing.assert_array_equal(plain.labels, [-1] * 4)
    assert plain.caption(0) is None
    for i in range(4):
        np.testing.assert_array_equal(plain.image(i), stacked[i])


@pytest.mark.parametrize("bad", [
    np.zeros((2, 4, 4, 3), dtype=np.float32),
    np.zeros((2, 4, 4), dtype=np.uint8),
    np.zeros((2, 4, 4, 4), dtype=np.uint8),
])
def test_index_arrays_rejects_bad_images(tmp_path, bad):
    with pytest.raises(DataError, match="expected uint8"):
        index_arrays(bad, tmp_path / "idx")


def test_long_key_is_rejected(tmp_path):
    with pytest.raises(DataError, match="longer than 48 bytes"):
        index_arrays(np.zeros((1, 2, 2, 3), dtype=np.uint8), tmp_path / "idx", keys=["k" * 49])


def test_index_files_are_consistent(tmp_path, np_rng):
    index = index_arrays(np_rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8),
                         tmp_path / "idx", labels=[1, 2, 3])
    meta = json.loads((tmp_path / "idx" / "metadata.json").read_text())
    assert meta["n"] == 3 and meta["hash"] == index.hash
    records = np.load(tmp_path / "idx" / "records.npy")
    assert len(records) == 3
    # the pack shard is stored relative to the index: the directory can move
    moved = shutil.copytree(tmp_path / "idx", tmp_path / "moved")
    shutil.rmtree(tmp_path / "idx")
    again = SampleIndex(moved)
    assert again.hash == meta["hash"]
    assert again.image(2).shape == (4, 4, 3)


# --------------------------------------------------------------------------- pickling, loader


@pytest.fixture
def mixed_index(tmp_path, np_rng) -> tuple[SampleIndex, list[np.ndarray]]:
    images = [np_rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8)
              for h, w in np_rng.integers(3, 20, size=(23, 2))]
    return index_arrays(images, tmp_path / "idx", labels=list(range(23))), images


def test_index_survives_pickling(mixed_index):
    index, images = mixed_index
    index.image(0)  # open a file handle first: it must not travel
    clone = pickle.loads(pickle.dumps(index))
    assert len(clone) == len(index) and clone.hash == index.hash
    assert clone.keys() == index.keys()
    np.testing.assert_array_equal(clone.labels, index.labels)
    for i in (0, 7, 22):
        np.testing.assert_array_equal(clone.image(i), images[i])
    clone.close()


def test_iter_decoded_same_with_and_without_workers(mixed_index):
    index, images = mixed_index
    ids = np.array([5, 0, 22, 7, 7, 13, 2, 19, 11, 1, 3])
    runs = [list(iter_decoded(index, ids, chunk=4, workers=w)) for w in (0, 1)]
    assert [len(b) for b in runs[0]] == [4, 4, 3]
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.sizes, b.sizes)
        assert a.images.dtype == b.images.dtype
        assert bool((a.images == b.images).all())
        assert a.skipped == b.skipped
    got = np.concatenate([b.ids for b in runs[1]])
    np.testing.assert_array_equal(got, ids)
    # every image top-left aligned in its slot, zero padding elsewhere
    for batch in runs[1]:
        for k, i in enumerate(batch.ids):
            h, w = images[i].shape[:2]
            np.testing.assert_array_equal(batch.sizes[k], [h, w])
            slot = batch.images[k].permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(slot[:h, :w], images[i])
            assert not slot[h:].any() and not slot[:, w:].any()



@pytest.mark.parametrize("part", [1, 3, 512])
def test_chunks_decoded_in_parts_by_workers_equal_whole_chunks(tmp_path, np_rng, monkeypatch,
                                                                part):
    """With workers a chunk is decoded in parts of DECODE_PART samples, by several workers,
    and put back together: bit for bit the batch decoding it at once gives (pixels, their
    layout, ids, and the skipped samples with their reasons, in order)."""
    from ffengine.data import loader

    samples = []
    for i in range(17):
        if i in (4, 11):
            samples.append(PackedSample(f"bad{i}", b"not an image", 0, "x"))
            continue
        h, w = (9, 9) if i % 5 else np_rng.integers(3, 20, 2)
        buf = io.BytesIO()
        Image.fromarray(np_rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        samples.append(PackedSample(f"s{i}", buf.getvalue(), 0, "x"))
    index = write_pack(samples, tmp_path / "idx")
    monkeypatch.setattr(loader, "DECODE_PART", part)
    ids = np_rng.permutation(17)
    chunks = [ids[:7], ids[7:14], ids[14:], ids[:0]]
    whole = list(loader.iter_chunks(index, chunks, workers=0))
    parts = list(loader.iter_chunks(index, chunks, workers=2))
    assert len(whole) == len(parts) == 4
    for a, b in zip(whole, parts, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        assert a.skipped == b.skipped
        assert torch.equal(a.packed.pixels, b.packed.pixels)
        np.testing.assert_array_equal(a.packed.sizes, b.packed.sizes)
        np.testing.assert_array_equal(a.packed.offsets, b.packed.offsets)
        assert a.packed.regular == b.packed.regular
    assert sorted(i for b in parts for i, _ in b.skipped) == [4, 11]
    assert len(np.concatenate([b.ids for b in parts])) == 15


def test_packed_batch_pads_any_selection_to_its_own_largest(mixed_index, np_rng):
    """A chunk is stored packed (the sum of its images' sizes); a selection is padded only to
    the largest image it holds, each image top-left aligned, zeros elsewhere."""
    index, images = mixed_index
    ids = np.array([5, 0, 22, 7, 13, 2, 19, 11, 1, 3])
    packed = decode_ids(index, ids).packed
    assert packed.pixels.dim() == 1 and not packed.regular
    assert packed.pixels.numel() == sum(images[i].size for i in ids)
    np.testing.assert_array_equal(np.diff(packed.offsets), [images[i].size for i in ids[:-1]])
    for sel in (np_rng.permutation(len(ids))[:4], np.array([3]), np.arange(len(ids))[::-1]):
        for out in (packed.padded(sel), packed.select(sel).padded()):
            want_h = max(images[ids[k]].shape[0] for k in sel)
            want_w = max(images[ids[k]].shape[1] for k in sel)
            assert out.shape == (len(sel), 3, want_h, want_w) and out.dtype == torch.uint8
            for slot, k in zip(out, sel, strict=True):
                h, w = images[ids[k]].shape[:2]
                np.testing.assert_array_equal(slot[:, :h, :w].permute(1, 2, 0).numpy(),
                                              images[ids[k]])
                assert not slot[:, h:].any() and not slot[:, :, w:].any()
    assert packed.padded(np.array([], dtype=np.int64)).shape[0] == 0


def test_packed_batch_of_one_size_pads_nothing(tmp_path, np_rng):
    images = np_rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
    batch = decode_ids(index_arrays(images, tmp_path / "idx"), range(6))
    assert batch.packed.regular
    np.testing.assert_array_equal(batch.images.permute(0, 2, 3, 1).numpy(), images)
    sub = batch.packed.select(np.array([4, 1, 5]))
    np.testing.assert_array_equal(sub.padded(np.array([2, 0])).permute(0, 2, 3, 1).numpy(),
                                  images[[5, 4]])
    run = batch.packed.select(np.arange(2, 5)).padded()  # consecutive: a view, no copy
    assert run.untyped_storage().data_ptr() == batch.packed.pixels.untyped_storage().data_ptr()
    np.testing.assert_array_equal(run.permute(0, 2, 3, 1).numpy(), images[2:5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_decoded_batch_is_pinned_by_the_data_loader(mixed_index):
    index, _ = mixed_index
    batches = list(iter_decoded(index, np.arange(8), chunk=4, pin_memory=True))
    assert all(b.packed.pixels.is_pinned() for b in batches)


@pytest.mark.parametrize("min_pixels", [1, 500, 1 << 22])
def test_pad_groups_partition_by_area_and_bound_the_padding(np_rng, monkeypatch, min_pixels):
    monkeypatch.setattr(packed_module, "MIN_GROUP_PIXELS", min_pixels)
    sizes = np.concatenate([np_rng.integers(1, 50, size=(40, 2)), [[3000, 2], [2, 3000]]])
    groups = pad_groups(sizes)
    np.testing.assert_array_equal(np.sort(np.concatenate(groups)), np.arange(len(sizes)))
    areas = [sizes[g].prod(1) for g in groups]
    for a, b in zip(areas, areas[1:], strict=False):
        assert a.max() <= b.min()  # ordered by area: each group's images no larger than the next
    for g in groups:
        padded = len(g) * sizes[g, 0].max() * sizes[g, 1].max()
        assert len(g) == 1 or padded <= max(min_pixels, 2.0 * sizes[g].prod(1).sum())
    thin = [k for k, g in enumerate(groups) if {40, 41} & set(g.tolist())]
    assert len(thin) == 2  # the two thin images are never padded together
    if min_pixels == 1 << 22:  # small images: one group, padding notwithstanding
        assert len(pad_groups(sizes[:40])) == 1
    # one size: one group, in order
    same = pad_groups(np.full((13, 2), 32))
    assert len(same) == 1 and same[0].tolist() == list(range(13))
    assert pad_groups(np.zeros((0, 2), np.int64)) == []
