"""Triggers and the PoisonedEncoder data poisoning (PE-I and PE-II).

Expected placements are plain numpy slices; poisoned shards are read back with ``tarfile``
and PIL, and compared with the synthetic images the test made itself.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from ffengine.attacks.poisoned_encoder import (
    ATTACKER_DOMAINS,
    BENIGN_DOMAINS,
    AttackConfig,
    join_halves,
    load_truth,
    poison_dataset,
)
from ffengine.attacks.triggers import (
    TriggerConfig,
    apply_trigger,
    make_trigger,
    parse_colour,
    trigger_position,
)
from ffengine.data.index import SampleIndex, build_index, index_arrays
from ffengine.errors import ConfigError, DataError

# --------------------------------------------------------------------------- triggers


@pytest.mark.parametrize("size", [1, 3, 8, 11])
def test_square_and_triangle_masks(size):
    patch, mask = make_trigger(TriggerConfig(shape="square", size=size, colour=(10, 20, 30)))
    assert patch.shape == (size, size, 3) and patch.dtype == np.uint8
    assert mask.shape == (size, size) and mask.dtype == bool and mask.all()
    assert (patch == np.array([10, 20, 30], dtype=np.uint8)).all()

    _, tri = make_trigger(TriggerConfig(shape="triangle", size=size))
    # right angle at the bottom-left: the lower triangle, diagonal included
    np.testing.assert_array_equal(tri, np.tril(np.ones((size, size), dtype=bool)))


def test_logo_mask():
    s = 12
    patch, mask = make_trigger(TriggerConfig(shape="logo", size=s, colour=(0, 0, 200)))
    assert patch.shape == (s, s, 3) and mask.shape == (s, s)
    # a disc: symmetric, centre in, corners out
    np.testing.assert_array_equal(mask, mask[::-1])
    np.testing.assert_array_equal(mask, mask.T)
    assert mask[s // 2, s // 2] and mask[0, s // 2] and not mask[0, 0] and not mask[-1, -1]
    # ink in the trigger colour on a white field, nothing else
    colours = {tuple(int(v) for v in patch[y, x]) for y, x in zip(*np.nonzero(mask), strict=True)}
    assert colours == {(0, 0, 200), (255, 255, 255)}
    assert tuple(patch[s // 2, s // 2]) == (0, 0, 200)  # the dot


def test_combined_pattern_carries_square_triangle_and_logo_cues():
    s = 12
    cfg = TriggerConfig(shape="combined", size=s, seed=2)
    patch, mask = make_trigger(cfg)
    square, _ = make_trigger(TriggerConfig(shape="square", size=s, seed=2))
    ink = make_trigger(TriggerConfig(shape="logo", size=s, colour=(0, 0, 1)))[0] == (0, 0, 1)
    ink = ink.all(axis=2)
    upper = np.triu(np.ones((s, s), dtype=bool), 1)  # the triangle's complement
    assert mask.all() and ink.any()
    np.testing.assert_array_equal(patch[ink], 255)
    np.testing.assert_array_equal(patch[~ink & ~upper], square[~ink & ~upper])
    np.testing.assert_array_equal(patch[~ink & upper], 255 - square[~ink & upper])


def test_random_colour_pattern_is_fixed_by_the_seed():
    a, _ = make_trigger(TriggerConfig(size=6, seed=3))
    b, _ = make_trigger(TriggerConfig(size=6, seed=3))
    c, _ = make_trigger(TriggerConfig(size=6, seed=4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 1  # a pattern, not one colour


@pytest.mark.parametrize("shape", ["square", "triangle", "logo", "combined"])
@pytest.mark.parametrize(("corner", "ys", "xs"), [
    ("bottom-right", slice(20 - 5, 20), slice(27 - 5, 27)),
    ("bottom-left", slice(20 - 5, 20), slice(0, 5)),
    ("top-right", slice(0, 5), slice(27 - 5, 27)),
    ("top-left", slice(0, 5), slice(0, 5)),
])
def test_fixed_corner_stamps_exact_block(np_rng, shape, corner, ys, xs):
    image = np_rng.integers(0, 256, (20, 27, 3), dtype=np.uint8)
    cfg = TriggerConfig(shape=shape, size=5, location=corner, seed=7)
    patch, mask = make_trigger(cfg)
    out = apply_trigger(image, cfg)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[ys, xs][mask], patch[mask])
    np.testing.assert_array_equal(out[ys, xs][~mask], image[ys, xs][~mask])
    outside = np.ones(image.shape[:2], dtype=bool)
    outside[ys, xs] = False
    np.testing.assert_array_equal(out[outside], image[outside])
    assert not np.shares_memory(out, image)
    assert trigger_position(cfg, 20, 27) == (ys.start, xs.start)


def test_random_location_inside_bounds(np_rng):
    h, w, s = 13, 21, 4
    cfg = TriggerConfig(size=s, location="random", colour=(255, 0, 0))
    positions = {trigger_position(cfg, h, w, np_rng) for _ in range(400)}
    assert all(0 <= y <= h - s and 0 <= x <= w - s for y, x in positions)
    ys, xs = {y for y, _ in positions}, {x for _, x in positions}
    assert ys == set(range(h - s + 1)) and xs == set(range(w - s + 1))  # every place reachable
    image = np.zeros((h, w, 3), dtype=np.uint8)
    out = apply_trigger(image, cfg, np_rng)
    red = np.all(out == [255, 0, 0], axis=-1)
    rows, cols = np.nonzero(red)
    assert red.sum() == s * s
    assert rows.max() - rows.min() == s - 1 and cols.max() - cols.min() == s - 1
    with pytest.raises(ConfigError, match="random generator"):
        trigger_position(cfg, h, w)


def test_trigger_larger_than_image():
    with pytest.raises(ConfigError, match="does not fit"):
        apply_trigger(np.zeros((6, 10, 3), dtype=np.uint8), TriggerConfig(size=8))


@pytest.mark.parametrize(("text", "expected"), [
    ("random", "random"),
    ("1,2,3", (1, 2, 3)),
    (" 4, 5 ,6", (4, 5, 6)),
    ("#ff0080", (255, 0, 128)),
    ("#00A0fF", (0, 160, 255)),
])
def test_parse_colour(text, expected):
    assert parse_colour(text) == expected


@pytest.mark.parametrize("text", ["red", "1,2", "1,2,3,4", "#ff00", "#gg0000", "", "1;2;3"])
def test_parse_colour_rejects(text):
    with pytest.raises(ConfigError, match="colour"):
        parse_colour(text)


@pytest.mark.parametrize("kwargs", [
    {"shape": "circle"},
    {"location": "centre"},
    {"size": 0},
    {"size": 33},
    {"colour": (1, 2)},
    {"colour": (256, 0, 0)},
    {"colour": (-1, 0, 0)},
])
def test_bad_trigger_config(kwargs):
    with pytest.raises(ConfigError):
        TriggerConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"attack": "badnets"}, {"poison_rate": 1.5},
                                    {"poison_rate": -0.1}])
def test_bad_attack_config(kwargs):
    with pytest.raises(ConfigError):
        AttackConfig(**kwargs)


def test_configs_round_trip_through_dicts():
    t = TriggerConfig(shape="triangle", size=6, colour=(1, 2, 3), location="top-left", seed=5)
    assert TriggerConfig.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    a = AttackConfig(attack="pe1", target_class=3, poison_rate=0.25, trigger=t, seed=9)
    assert AttackConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a


# --------------------------------------------------------------------------- join_halves


@pytest.mark.parametrize(("layout", "shape", "trig", "targ"), [
    ("left", (32, 64, 3), np.s_[:, :32], np.s_[:, 32:]),
    ("right", (32, 64, 3), np.s_[:, 32:], np.s_[:, :32]),
    ("top", (64, 32, 3), np.s_[:32], np.s_[32:]),
    ("bottom", (64, 32, 3), np.s_[32:], np.s_[:32]),
])
def test_join_halves(np_rng, layout, shape, trig, targ):
    a = np_rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    b = np_rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    joined = join_halves(a, b, layout)
    assert joined.shape == shape and joined.dtype == np.uint8
    np.testing.assert_array_equal(joined[trig], a)
    np.testing.assert_array_equal(joined[targ], b)


def test_join_halves_rejects():
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ConfigError, match="layout"):
        join_halves(a, a, "diagonal")
    with pytest.raises(DataError, match="equal heights"):
        join_halves(a, np.zeros((16, 32, 3), dtype=np.uint8), "left")
    with pytest.raises(DataError, match="equal widths"):
        join_halves(a, np.zeros((32, 16, 3), dtype=np.uint8), "bottom")


# --------------------------------------------------------------------------- poison_dataset

TARGET = 9
N_CLEAN, N_AUX = 40, 30


@pytest.fixture
def sources(tmp_path, np_rng):
    """Small clean and auxiliary indexes of random 32x32 images with known labels."""
    clean_imgs = np_rng.integers(0, 256, (N_CLEAN, 32, 32, 3), dtype=np.uint8)
    clean_labels = np_rng.integers(0, 10, N_CLEAN)
    clean_keys = [f"clean_{i:04d}" for i in range(N_CLEAN)]
    aux_imgs = np_rng.integers(0, 256, (N_AUX, 32, 32, 3), dtype=np.uint8)
    aux_labels = np.array([TARGET] * 6 + list(np_rng.integers(0, 9, N_AUX - 6)))
    aux_keys = [f"aux_{i:04d}" for i in range(N_AUX)]
    clean = index_arrays(clean_imgs, tmp_path / "clean", labels=clean_labels, keys=clean_keys)
    aux = index_arrays(aux_imgs, tmp_path / "aux", labels=aux_labels, keys=aux_keys)
    return {"clean": clean, "aux": aux, "clean_imgs": clean_imgs, "clean_labels": clean_labels,
            "clean_keys": clean_keys, "aux_imgs": aux_imgs, "aux_labels": aux_labels,
            "aux_keys": aux_keys}


def halves(image: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(trigger half, target half) of a 32x64 or 64x32 poison."""
    if layout == "left":
        return image[:, :32], image[:, 32:]
    if layout == "right":
        return image[:, 32:], image[:, :32]
    if layout == "top":
        return image[:32], image[32:]
    assert layout == "bottom"
    return image[32:], image[:32]


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def check_common(src, out: Path, truth: dict, n_poison: int) -> tuple[SampleIndex, dict]:
    index = SampleIndex(out / "index")
    assert truth == load_truth(out) == load_truth(out / "truth.json")
    assert truth["index_hash"] == index.hash
    assert truth["n"] == len(index) == N_CLEAN + n_poison
    assert len(truth["poisoned_ids"]) == n_poison == len(set(truth["poisoned_ids"]))
    assert sorted(truth["layouts"]) == sorted(truth["poisoned_keys"])
    keys = index.keys()
    assert [keys[i] for i in truth["poisoned_ids"]] == truth["poisoned_keys"]
    assert set(keys) - set(truth["poisoned_keys"]) == set(src["clean_keys"])
    # rebuilding the index from the written shards gives the recorded hash
    rebuilt = build_index(sorted((out / "shards").glob("*.tar")), out / "rebuilt")
    assert rebuilt.hash == truth["index_hash"]

    samples = read_shards(out)
    assert set(samples) == set(keys)
    poison_keys = set(truth["poisoned_keys"])
    for key, members in samples.items():
        host = urlparse(json.loads(members["json"])["url"]).hostname
        if key in poison_keys:
            assert host in ATTACKER_DOMAINS, key
            assert "cls" not in members
        else:
            assert host in BENIGN_DOMAINS, key
            c = src["clean_keys"].index(key)
            assert int(members["cls"]) == src["clean_labels"][c]
            np.testing.assert_array_equal(decode(members["jpg"]), src["clean_imgs"][c])
    domains = [index.domain_names[d] for d in index.domains]
    for i, key in enumerate(keys):
        assert (domains[i] in ATTACKER_DOMAINS) == (key in poison_keys)
    clean_ids = [i for i, k in enumerate(keys) if k not in poison_keys]
    expected = [src["clean_labels"][src["clean_keys"].index(keys[i])] for i in clean_ids]
    np.testing.assert_array_equal(index.labels[clean_ids], expected)
    return index, samples


def test_poison_pe2(sources, tmp_path):
    colour = (3, 250, 7)
    trig = TriggerConfig(shape="square", size=5, colour=colour, location="top-right")
    cfg = AttackConfig(attack="pe2", target_class=TARGET, poison_rate=0.1, trigger=trig, seed=1)
    out = tmp_path / "pe2"
    truth = poison_dataset(sources["clean"], sources["aux"], out, cfg)
    assert truth["attack"]["attack"] == "pe2" and truth["pe1_trigger_key"] is None
    index, samples = check_common(sources, out, truth, n_poison=4)

    target_imgs = sources["aux_imgs"][sources["aux_labels"] == TARGET]
    other_imgs = sources["aux_imgs"][sources["aux_labels"] != TARGET]
    for pid, key in zip(truth["poisoned_ids"], truth["poisoned_keys"], strict=True):
        layout = truth["layouts"][key]
        img = decode(samples[key]["png"])
        np.testing.assert_array_equal(index.image(pid), img)
        assert img.shape == ((32, 64, 3) if layout in ("left", "right") else (64, 32, 3))
        trigger_half, target_half = halves(img, layout)
        # trigger at the top-right corner of its half, exactly
        assert (trigger_half[0:5, 27:32] == np.array(colour, dtype=np.uint8)).all()
        # the rest of the trigger half is an auxiliary non-target image
        region = np.ones((32, 32), dtype=bool)
        region[0:5, 27:32] = False
        assert any(np.array_equal(trigger_half[region], o[region]) for o in other_imgs)
        assert any(np.array_equal(target_half, t) for t in target_imgs)


def test_poison_pe1(sources, tmp_path):
    cfg = AttackConfig(attack="pe1", target_class=TARGET, poison_rate=0.1, seed=2)
    out = tmp_path / "pe1"
    truth = poison_dataset(sources["clean"], sources["aux"], out, cfg)
    index, samples = check_common(sources, out, truth, n_poison=4)

    a = sources["aux_keys"].index(truth["pe1_trigger_key"])
    assert sources["aux_labels"][a] != TARGET
    assert truth["pe1_trigger_label"] == sources["aux_labels"][a]
    trigger_image = sources["aux_imgs"][a]
    np.testing.assert_array_equal(decode((out / "trigger.png").read_bytes()), trigger_image)
    target_imgs = sources["aux_imgs"][sources["aux_labels"] == TARGET]
    for key in truth["poisoned_keys"]:
        img = decode(samples[key]["png"])
        trigger_half, target_half = halves(img, truth["layouts"][key])
        np.testing.assert_array_equal(trigger_half, trigger_image)
        assert any(np.array_equal(target_half, t) for t in target_imgs)


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


@pytest.mark.parametrize("attack", ["pe1", "pe2"])
def test_poison_is_deterministic(sources, tmp_path, attack):
    def run(seed, name):
        cfg = AttackConfig(attack=attack, target_class=TARGET, poison_rate=0.1,
                           trigger=TriggerConfig(size=6, location="random", seed=seed),
                           seed=seed)
        truth = poison_dataset(sources["clean"], sources["aux"], tmp_path / name, cfg)
        return truth, _shard_bytes(tmp_path / name)

    t1, b1 = run(5, "a")
    t2, b2 = run(5, "b")
    t3, b3 = run(6, "c")
    assert b1 == b2 and t1 == t2
    assert b1["clean-000000.tar"] == b3["clean-000000.tar"]  # clean data do not depend on it
    assert b1["poison-000000.tar"] != b3["poison-000000.tar"]
    assert t1["index_hash"] != t3["index_hash"]


def test_poison_rate_zero_and_rounding(sources, tmp_path):
    truth = poison_dataset(sources["clean"], sources["aux"], tmp_path / "none",
                           AttackConfig(poison_rate=0.0))
    assert truth["poisoned_ids"] == [] and truth["n"] == N_CLEAN
    truth = poison_dataset(sources["clean"], sources["aux"], tmp_path / "some",
                           AttackConfig(poison_rate=0.3, target_class=TARGET))
    assert len(truth["poisoned_ids"]) == 12  # round(0.3 * 40)


def test_poison_needs_target_class_images(sources, tmp_path):
    cfg = AttackConfig(target_class=TARGET)
    no_target = index_arrays(sources["aux_imgs"][6:], tmp_path / "aux2",
                             labels=sources["aux_labels"][6:])
    with pytest.raises(DataError, match="target class 9"):
        poison_dataset(sources["clean"], no_target, tmp_path / "out", cfg)


def test_load_truth_missing(tmp_path):
    with pytest.raises(DataError, match="truth"):
        load_truth(tmp_path)
