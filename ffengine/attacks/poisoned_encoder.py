"""PoisonedEncoder (Liu, Jia, Gong; USENIX Security 2022), both variants.

A poisoned input joins a trigger-carrying image and a random target-class image side by
side (or one above the other) at native resolution, so that random crops of one poison see
one half or the other and contrastive learning pulls "trigger" towards "target class".

* PE-I: the trigger is one whole image (the attacker's reference input ``x_b``).
* PE-II: the trigger is a patch stamped on auxiliary non-target images.

:func:`poison_dataset` writes the clean samples (with a source ``url`` on one of several
benign domains) and the poisons (urls on attacker domains) as new shards, indexes them and
writes the ground truth.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.index import SampleIndex, build_index
from ..data.shards import ShardWriter
from ..errors import ConfigError, DataError
from ..io_utils import atomic_write_json
from .triggers import TriggerConfig, apply_trigger

ATTACKS = ("pe1", "pe2")
LAYOUTS = ("left", "right", "top", "bottom")  # where the trigger half sits
BENIGN_DOMAINS = (
    "photos.alpine-gallery.example", "img.citylens.example", "cdn.wildlife-archive.example",
    "media.roadtrip-blog.example", "static.petpics.example", "images.harbor-news.example",
    "pics.skyline-forum.example", "uploads.farmstead.example",
)
ATTACKER_DOMAINS = ("cdn.free-hd-wallpapers.example", "img.bargain-autos.example")
SHARD_SIZE = 5000


@dataclass(frozen=True)
class AttackConfig:
    attack: str = "pe2"
    target_class: int = 9
    poison_rate: float = 0.1  # poisons added, as a fraction of the clean set's size
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    seed: int = 0

    def __post_init__(self):
        if self.attack not in ATTACKS:
            raise ConfigError(f"attack {self.attack!r} is not a PoisonedEncoder variant; "
                              f"expected one of {ATTACKS}.")
        if not 0 <= self.poison_rate <= 1:
            raise ConfigError(f"poison rate {self.poison_rate} must lie in [0, 1].")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trigger"] = self.trigger.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AttackConfig:
        return cls(attack=d["attack"], target_class=int(d["target_class"]),
                   poison_rate=float(d["poison_rate"]),
                   trigger=TriggerConfig.from_dict(d["trigger"]), seed=int(d["seed"]))


def join_halves(trigger_half: np.ndarray, target_half: np.ndarray, layout: str) -> np.ndarray:
    """Concatenate two (H, W, 3) images; ``layout`` says where the trigger half goes."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is unknown; expected one of {LAYOUTS}.")
    if layout in ("left", "right"):
        if trigger_half.shape[0] != target_half.shape[0]:
            raise DataError("halves joined side by side need equal heights, got "
                            f"{trigger_half.shape} and {target_half.shape}.")
        pair = (trigger_half, target_half) if layout == "left" else (target_half, trigger_half)
        return np.concatenate(pair, axis=1)
    if trigger_half.shape[1] != target_half.shape[1]:
        raise DataError("halves stacked vertically need equal widths, got "
                        f"{trigger_half.shape} and {target_half.shape}.")
    pair = (trigger_half, target_half) if layout == "top" else (target_half, trigger_half)
    return np.concatenate(pair, axis=0)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")  # lossless: the trigger stays exact
    return buf.getvalue()


def benign_domain(key: str) -> str:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    return BENIGN_DOMAINS[h % len(BENIGN_DOMAINS)]


@dataclass
class Poison:
    key: str
    image: np.ndarray
    layout: str
    carrier_id: int  # aux sample that carries the trigger (PE-II) or -1 (PE-I)
    target_id: int  # aux sample of the target class


def make_poisons(cfg: AttackConfig, n_clean: int, aux: SampleIndex,
                 trigger_image: np.ndarray | None = None) -> list[Poison]:
    """The poisoned inputs of an attack on a clean set of ``n_clean`` samples."""
    rng = np.random.default_rng(cfg.seed)
    n = int(round(cfg.poison_rate * n_clean))
    labels = aux.labels
    targets = np.flatnonzero(labels == cfg.target_class)
    others = np.flatnonzero((labels != cfg.target_class) & (labels >= 0))
    if len(targets) == 0:
        raise DataError(f"the auxiliary data hold no image of target class {cfg.target_class}.")
    if cfg.attack == "pe2" and len(others) == 0:
        raise DataError("the auxiliary data hold no non-target image to carry the trigger.")
    target_ids = rng.choice(targets, size=n, replace=len(targets) < n)
    carrier_ids = (rng.choice(others, size=n, replace=len(others) < n) if cfg.attack == "pe2"
                   else np.full(n, -1))
    layouts = rng.integers(0, len(LAYOUTS), size=n)
    poisons = []
    for p in range(n):
        target = aux.image(int(target_ids[p]))
        if cfg.attack == "pe2":
            half = apply_trigger(aux.image(int(carrier_ids[p])), cfg.trigger, rng)
        else:
            if trigger_image is None:
                raise ConfigError("PE-I needs the trigger image.")
            half = trigger_image
        layout = LAYOUTS[int(layouts[p])]
        poisons.append(Poison(f"poison_{p:06d}", join_halves(half, target, layout), layout,
                              int(carrier_ids[p]), int(target_ids[p])))
    return poisons


def choose_pe1_trigger(cfg: AttackConfig, pool: SampleIndex) -> int:
    """PE-I's trigger: one non-target image of the attacker's pool, fixed by the seed."""
    rng = np.random.default_rng([cfg.seed, 1])
    cands = np.flatnonzero((pool.labels != cfg.target_class) & (pool.labels >= 0))
    return int(rng.choice(cands))


def index_with_truth(shard_paths: list[Path], out: Path, poison_keys: set[str],
                     attack: dict) -> dict:
    """Index ``shard_paths`` into ``out/index``; the ground truth's common part: the attack,
    the index hash and the ids and keys of the poisons."""
    index = build_index(shard_paths, out / "index")
    keys = index.keys()
    poisoned_ids = [i for i, k in enumerate(keys) if k in poison_keys]
    return {"attack": attack, "index_hash": index.hash, "n": len(index),
            "poisoned_ids": poisoned_ids, "poisoned_keys": [keys[i] for i in poisoned_ids]}


def poison_dataset(clean: SampleIndex, aux: SampleIndex, out: str | Path,
                   cfg: AttackConfig) -> dict:
    """Write ``out/shards/clean-*.tar`` and ``out/shards/poison-*.tar``, index them into
    ``out/index`` and write ``out/truth.json``. Returns the ground truth."""
    out = Path(out)
    shards = out / "shards"
    trigger_image, trigger_source, trigger_label = None, None, None
    if cfg.attack == "pe1":
        tid = choose_pe1_trigger(cfg, aux)
        trigger_image, trigger_source = aux.image(tid), aux.key(tid)
        trigger_label = int(aux.labels[tid])
    poisons = make_poisons(cfg, len(clean), aux, trigger_image)

    paths = []
    for s in range(0, len(clean), SHARD_SIZE):
        path = shards / f"clean-{s // SHARD_SIZE:06d}.tar"
        with ShardWriter(path) as w:
            for i in range(s, min(s + SHARD_SIZE, len(clean))):
                key = clean.key(i)
                members = {"jpg": clean.image_bytes(i),
                           "json": {"url": f"https://{benign_domain(key)}/{key}.jpg"}}
                if clean.labels[i] >= 0:
                    members["cls"] = int(clean.labels[i])
                w.write(key, members)
        paths.append(path)
    rng = np.random.default_rng([cfg.seed, 2])
    for s in range(0, len(poisons), SHARD_SIZE):
        path = shards / f"poison-{s // SHARD_SIZE:06d}.tar"
        with ShardWriter(path) as w:
            for p in poisons[s: s + SHARD_SIZE]:
                dom = ATTACKER_DOMAINS[int(rng.integers(len(ATTACKER_DOMAINS)))]
                w.write(p.key, {"png": png_bytes(p.image),
                                "json": {"url": f"https://{dom}/{p.key}.png"}})
        paths.append(path)
    truth = index_with_truth(paths, out, {p.key for p in poisons}, cfg.to_dict())
    truth.update({
        "layouts": {p.key: p.layout for p in poisons},
        "attacker_domains": list(ATTACKER_DOMAINS),
        "pe1_trigger_key": trigger_source,
        # the trigger image's own class: x_r must come from another one (DESIGN.md §1)
        "pe1_trigger_label": trigger_label,
    })
    if trigger_image is not None:
        (out / "trigger.png").write_bytes(png_bytes(trigger_image))
    atomic_write_json(out / "truth.json", truth)
    return truth


def load_truth(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "truth.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read the ground truth {path} ({e}); expected the truth.json "
                        "that `ffengine poison` writes.") from e
