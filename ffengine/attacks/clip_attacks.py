"""Data-poisoning attacks on image-caption pre-training, and CorruptEncoder on SimCLR.

* **Carlini-Terzis** (``ct``; Carlini & Terzis, "Poisoning and Backdooring Contrastive
  Learning", ICLR 2022): random (non-target) images get a 16×16 Gaussian-noise patch at a
  random location, and their captions are replaced by a prompt template of the target
  label. The noise pattern is the trigger, fixed by the attack seed (``ct_noise="fixed"``;
  ``"per-image"`` draws a new pattern for every image); the location is drawn per image
  from a seed derived from (attack seed, image). Values are ``128 + σ·N(0, 1)`` rounded and
  clipped to [0, 255].
* **CorruptEncoder** (``corruptencoder``; Zhang, Jia, Gong et al., "CorruptEncoder:
  Data Poisoning based Backdoor Attacks to Contrastive Learning", CVPR 2024):
  - CLIP (``modality="clip"``): the trigger patch embedded into target-class images, each
    captioned with a target-class caption;
  - SimCLR (``modality="simclr"``): a composite on a canvas twice the object's width: a
    background (a non-target image resized to the canvas), a target-class reference object
    in one half, and the trigger in the central band of the other half (its centre in the
    middle half of that half's rows and columns), so random crops see object and trigger
    apart, or together.

:func:`poison_clip_dataset` writes the clean samples as image-caption shards (captions from
:mod:`ffengine.data.captions`, urls on benign domains) and the poisons (urls on attacker
domains) as new shards, indexes them and writes the ground truth in the format of
:func:`ffengine.attacks.poisoned_encoder.poison_dataset`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.captions import caption_for, write_caption_shards
from ..data.demo_data import CIFAR10_CLASSES
from ..data.index import SampleIndex
from ..data.shards import ShardWriter
from ..errors import ConfigError, DataError
from ..io_utils import atomic_write_json
from .poisoned_encoder import ATTACKER_DOMAINS, index_with_truth, png_bytes
from .triggers import TriggerConfig, make_trigger, stamp, trigger_position

CLIP_ATTACKS = ("ct", "corruptencoder")
MODALITIES = ("clip", "simclr")
CT_NOISE = ("fixed", "per-image")
SHARD_SIZE = 5000


@dataclass(frozen=True)
class ClipAttackConfig:
    attack: str = "ct"
    modality: str = "clip"  # CorruptEncoder's target: clip or simclr (CT is CLIP-only)
    target_class: int = 9
    poison_rate: float = 0.05  # poisons added, as a fraction of the clean set's size
    patch_size: int = 16  # CT: side of the noise patch
    noise_std: float = 64.0  # CT: σ of the noise around grey 128, in pixel values
    ct_noise: str = "fixed"  # CT: one pattern for all images, or a new one per image
    # CorruptEncoder's trigger patch (where CLIP's goes: its location; SimCLR ignores it)
    trigger: TriggerConfig = field(default_factory=lambda: TriggerConfig(location="random"))
    seed: int = 0

    def __post_init__(self):
        if self.attack not in CLIP_ATTACKS:
            raise ConfigError(f"attack {self.attack!r} is not one of {CLIP_ATTACKS}.")
        if self.modality not in MODALITIES:
            raise ConfigError(f"modality {self.modality!r} is not one of {MODALITIES}.")
        if self.attack == "ct" and self.modality != "clip":
            raise ConfigError("Carlini-Terzis poisons image-caption pairs: modality must be "
                              "'clip'.")
        if not 0 <= self.poison_rate <= 1:
            raise ConfigError(f"poison rate {self.poison_rate} must lie in [0, 1].")
        if not 1 <= self.patch_size <= 256:
            raise ConfigError(f"patch size {self.patch_size} is out of range 1..256.")
        if self.ct_noise not in CT_NOISE:
            raise ConfigError(f"ct_noise {self.ct_noise!r} is not one of {CT_NOISE}.")
        if not self.noise_std >= 0:
            raise ConfigError(f"noise_std {self.noise_std} must be non-negative.")

    @property
    def name(self) -> str:
        return "ct" if self.attack == "ct" else f"corruptencoder-{self.modality}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trigger"] = self.trigger.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ClipAttackConfig:
        return cls(attack=d["attack"], modality=d.get("modality", "clip"),
                   target_class=int(d["target_class"]), poison_rate=float(d["poison_rate"]),
                   patch_size=int(d.get("patch_size", 16)),
                   noise_std=float(d.get("noise_std", 64.0)),
                   ct_noise=d.get("ct_noise", "fixed"),
                   trigger=TriggerConfig.from_dict(d["trigger"]), seed=int(d["seed"]))


# --------------------------------------------------------------------------- Carlini-Terzis
def ct_noise_patch(cfg: ClipAttackConfig, image_seed: int | None = None) -> np.ndarray:
    """The (s, s, 3) uint8 Gaussian-noise patch: the attack's fixed pattern, or (with
    ``ct_noise="per-image"``) the pattern of image ``image_seed``."""
    parts = [cfg.seed, 11] if cfg.ct_noise == "fixed" or image_seed is None else [
        cfg.seed, 12, image_seed]
    z = np.random.default_rng(parts).standard_normal((cfg.patch_size, cfg.patch_size, 3))
    return np.clip(np.rint(128.0 + cfg.noise_std * z), 0, 255).astype(np.uint8)


def apply_ct_patch(image: np.ndarray, cfg: ClipAttackConfig, image_seed: int
                   ) -> tuple[np.ndarray, tuple[int, int]]:
    """``image`` with the noise patch at a location drawn from (attack seed, ``image_seed``);
    returns the image and the patch's top-left (y, x)."""
    s = cfg.patch_size
    h, w = image.shape[:2]
    if s > h or s > w:
        raise ConfigError(f"a {s}×{s} noise patch does not fit a {h}×{w} image.")
    rng = np.random.default_rng([cfg.seed, 13, image_seed])
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    patch = ct_noise_patch(cfg, image_seed)
    return stamp(image, patch, np.ones((s, s), dtype=bool), y, x), (y, x)


# --------------------------------------------------------------------------- CorruptEncoder
def apply_ce_trigger(image: np.ndarray, cfg: ClipAttackConfig, image_seed: int
                     ) -> tuple[np.ndarray, tuple[int, int]]:
    """``image`` with CorruptEncoder's trigger patch (location from the trigger config; a
    random one drawn from (attack seed, ``image_seed``))."""
    patch, mask = make_trigger(cfg.trigger)
    rng = np.random.default_rng([cfg.seed, 14, image_seed])
    y, x = trigger_position(cfg.trigger, image.shape[0], image.shape[1], rng)
    return stamp(image, patch, mask, y, x), (y, x)


def central_band(h: int, w: int, s: int, side: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Allowed top-left ranges ``((y0, y1), (x0, x1))`` (inclusive) of an s×s trigger whose
    centre lies in the middle half of the rows and of the columns of the ``side`` half
    ("left" or "right") of an h × 2w canvas, clamped to keep it inside that half."""
    x_off = 0 if side == "left" else w

    def rng_for(extent: int) -> tuple[int, int]:
        lo = int(np.ceil(extent / 4 - s / 2))
        hi = int(np.floor(3 * extent / 4 - s / 2))
        lo, hi = max(lo, 0), min(hi, extent - s)
        if lo > hi:  # a trigger larger than the band: centre it
            lo = hi = max((extent - s) // 2, 0)
        return lo, hi

    (y0, y1), (x0, x1) = rng_for(h), rng_for(w)
    return (y0, y1), (x0 + x_off, x1 + x_off)


def corruptencoder_composite(obj: np.ndarray, background: np.ndarray, cfg: ClipAttackConfig,
                             rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """CorruptEncoder's SimCLR poison: an h × 2w canvas holding ``background`` (resized to
    fill it), the (h, w) target-class ``obj`` in one half and the trigger in the central band
    of the other. Returns the image and its geometry (object side, trigger top-left)."""
    h, w = obj.shape[:2]
    s = cfg.trigger.size
    if s > h or s > w:
        raise ConfigError(f"a trigger of size {s} does not fit the {h}×{w} half of the canvas.")
    canvas = np.array(Image.fromarray(background).resize((2 * w, h), Image.BILINEAR))
    obj_side = "left" if rng.integers(2) == 0 else "right"
    trig_side = "right" if obj_side == "left" else "left"
    ox = 0 if obj_side == "left" else w
    canvas[:, ox: ox + w] = obj
    (y0, y1), (x0, x1) = central_band(h, w, s, trig_side)
    y, x = int(rng.integers(y0, y1 + 1)), int(rng.integers(x0, x1 + 1))
    patch, mask = make_trigger(cfg.trigger)
    canvas = stamp(canvas, patch, mask, y, x)
    return canvas, {"object_side": obj_side, "trigger_yx": [y, x]}


# --------------------------------------------------------------------------- poisons
@dataclass
class ClipPoison:
    key: str
    image: np.ndarray
    caption: str | None
    sources: dict  # aux ids and geometry, for the ground truth


def make_clip_poisons(cfg: ClipAttackConfig, n_clean: int, aux: SampleIndex,
                      class_names: tuple[str, ...] = CIFAR10_CLASSES) -> list[ClipPoison]:
    """The poisoned inputs of an attack on a clean set of ``n_clean`` samples."""
    rng = np.random.default_rng([cfg.seed, 10])
    n = int(round(cfg.poison_rate * n_clean))
    labels = aux.labels
    targets = np.flatnonzero(labels == cfg.target_class)
    others = np.flatnonzero((labels != cfg.target_class) & (labels >= 0))
    if not 0 <= cfg.target_class < len(class_names):
        raise ConfigError(f"target class {cfg.target_class} has no name among {class_names}.")
    target_name = class_names[cfg.target_class]
    need_targets = cfg.attack == "corruptencoder"
    need_others = cfg.attack == "ct" or cfg.modality == "simclr"
    if need_targets and len(targets) == 0:
        raise DataError(f"the auxiliary data hold no image of target class {cfg.target_class}.")
    if need_others and len(others) == 0:
        raise DataError("the auxiliary data hold no non-target image.")
    poisons = []
    for p in range(n):
        key = f"poison_{p:06d}"
        caption = caption_for(key, target_name, cfg.seed) if cfg.modality == "clip" else None
        if cfg.attack == "ct":
            cid = int(rng.choice(others))
            img, yx = apply_ct_patch(aux.image(cid), cfg, p)
            poisons.append(ClipPoison(key, img, caption,
                                      {"carrier_id": cid, "patch_yx": list(yx)}))
        elif cfg.modality == "clip":
            tid = int(rng.choice(targets))
            img, yx = apply_ce_trigger(aux.image(tid), cfg, p)
            poisons.append(ClipPoison(key, img, caption,
                                      {"target_id": tid, "trigger_yx": list(yx)}))
        else:
            tid, bid = int(rng.choice(targets)), int(rng.choice(others))
            img, geo = corruptencoder_composite(aux.image(tid), aux.image(bid), cfg, rng)
            poisons.append(ClipPoison(key, img, None,
                                      {"target_id": tid, "background_id": bid, **geo}))
    return poisons


def trigger_image(cfg: ClipAttackConfig, image: np.ndarray, image_seed: int) -> np.ndarray:
    """A test image carrying the attack's trigger (for x_b and the backdoor strength)."""
    if cfg.attack == "ct":
        return apply_ct_patch(image, cfg, image_seed)[0]
    return apply_ce_trigger(image, cfg, image_seed)[0]


def poison_clip_dataset(clean: SampleIndex, aux: SampleIndex, out: str | Path,
                        cfg: ClipAttackConfig,
                        class_names: tuple[str, ...] = CIFAR10_CLASSES) -> dict:
    """Write ``out/shards/clean-*.tar`` (image-caption pairs of ``clean``: its captions, or
    template captions of its labels) and ``out/shards/poison-*.tar``, index them into
    ``out/index`` and write ``out/truth.json``. Returns the ground truth."""
    out = Path(out)
    shards = out / "shards"
    poisons = make_clip_poisons(cfg, len(clean), aux, class_names)
    paths = write_caption_shards(clean, shards, "clean", cfg.seed, class_names)
    rng = np.random.default_rng([cfg.seed, 2])
    for s in range(0, len(poisons), SHARD_SIZE):
        path = shards / f"poison-{s // SHARD_SIZE:06d}.tar"
        with ShardWriter(path) as w:
            for p in poisons[s: s + SHARD_SIZE]:
                dom = ATTACKER_DOMAINS[int(rng.integers(len(ATTACKER_DOMAINS)))]
                meta = {"url": f"https://{dom}/{p.key}.png", "key": p.key,
                        "width": int(p.image.shape[1]), "height": int(p.image.shape[0])}
                members = {"png": png_bytes(p.image)}
                if p.caption is not None:
                    members["txt"] = p.caption
                    meta["caption"] = p.caption
                members["json"] = meta
                w.write(p.key, members)
        paths.append(path)
    truth = index_with_truth(paths, out, {p.key for p in poisons}, cfg.to_dict())
    truth.update({
        "attack_name": cfg.name,
        "sources": {p.key: p.sources for p in poisons},
        "attacker_domains": list(ATTACKER_DOMAINS),
        "class_names": list(class_names),
    })
    trig = ct_noise_patch(cfg) if cfg.attack == "ct" else make_trigger(cfg.trigger)[0]
    (out / "trigger.png").parent.mkdir(parents=True, exist_ok=True)
    (out / "trigger.png").write_bytes(png_bytes(trig))
    atomic_write_json(out / "truth.json", truth)
    return truth


__all__ = ["CLIP_ATTACKS", "ClipAttackConfig", "ClipPoison", "apply_ce_trigger",
           "apply_ct_patch", "central_band", "corruptencoder_composite", "ct_noise_patch",
           "make_clip_poisons", "poison_clip_dataset", "trigger_image"]
