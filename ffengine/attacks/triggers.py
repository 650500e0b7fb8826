"""Backdoor triggers: square patches (PE-II's), and triangle, image-logo and combined
patterns for adaptive attacks. A trigger is a (s, s, 3) uint8 patch with a (s, s) boolean
mask; stamping writes the masked pixels into an image."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ConfigError

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")
SHAPES = ("square", "triangle", "logo", "combined")


@dataclass(frozen=True)
class TriggerConfig:
    shape: str = "square"
    size: int = 8
    # "random": a fixed pattern of random colours (drawn from ``seed``); or an (r, g, b) colour
    colour: str | tuple[int, int, int] = "random"
    location: str = "bottom-right"  # a corner, or "random" (a new place for every image)
    seed: int = 0

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ConfigError(f"trigger shape {self.shape!r} is unknown; expected one of "
                              f"{SHAPES}.")
        if self.location not in CORNERS + ("random",):
            raise ConfigError(f"trigger location {self.location!r} is unknown; expected one "
                              f"of {CORNERS + ('random',)}.")
        if not 1 <= self.size <= 32:
            raise ConfigError(f"trigger size {self.size} is out of range; expected 1..32.")
        if self.colour != "random":
            c = tuple(self.colour)
            if len(c) != 3 or not all(0 <= int(v) <= 255 for v in c):
                raise ConfigError(f"trigger colour {self.colour!r} must be 'random' or three "
                                  "integers 0..255.")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["colour"] != "random":
            d["colour"] = list(d["colour"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TriggerConfig:
        colour = d.get("colour", "random")
        return cls(shape=d.get("shape", "square"), size=int(d.get("size", 8)),
                   colour=colour if colour == "random" else tuple(int(v) for v in colour),
                   location=d.get("location", "bottom-right"), seed=int(d.get("seed", 0)))


def parse_colour(text: str) -> str | tuple[int, int, int]:
    """'random', 'r,g,b' or '#rrggbb' -> a TriggerConfig colour."""
    if text == "random":
        return text
    try:
        if text.startswith("#") and len(text) == 7:
            return tuple(int(text[k: k + 2], 16) for k in (1, 3, 5))
        r, g, b = (int(v) for v in text.split(","))
        return (r, g, b)
    except ValueError as e:
        raise ConfigError(f"colour {text!r} is not 'random', 'r,g,b' or '#rrggbb'.") from e


def make_trigger(cfg: TriggerConfig) -> tuple[np.ndarray, np.ndarray]:
    """The trigger's (s, s, 3) uint8 patch and (s, s) bool mask."""
    s = cfg.size
    rng = np.random.default_rng(cfg.seed)
    if cfg.colour == "random":
        patch = rng.integers(0, 256, size=(s, s, 3), dtype=np.uint8)
    else:
        patch = np.broadcast_to(np.asarray(cfg.colour, dtype=np.uint8), (s, s, 3)).copy()
    yy, xx = np.mgrid[0:s, 0:s]
    if cfg.shape == "square":
        mask = np.ones((s, s), dtype=bool)
    elif cfg.shape == "triangle":  # right triangle, right angle at the bottom-left
        mask = xx <= yy
    elif cfg.shape == "logo":  # a ring around a dot, drawn in the patch colours on white
        ink, disc = _logo(s)
        patch = np.where(ink[..., None], patch, np.uint8(255)).astype(np.uint8)
        mask = disc
    else:  # "combined": all three cues in one square patch: the square's colours, their
        # inverse on the triangle's complement (the upper-right half) and the logo's ink white
        ink, _ = _logo(s)
        patch = np.where((xx > yy)[..., None], 255 - patch, patch)
        patch = np.where(ink[..., None], np.uint8(255), patch).astype(np.uint8)
        mask = np.ones((s, s), dtype=bool)
    return patch, mask


def _logo(s: int) -> tuple[np.ndarray, np.ndarray]:
    """The logo's (s, s) ink (a ring around a dot) and its disc."""
    yy, xx = np.mgrid[0:s, 0:s]
    c = (s - 1) / 2
    r = np.hypot(yy - c, xx - c)
    ink = (np.abs(r - 0.75 * c) <= max(0.5, 0.2 * c)) | (r <= 0.3 * c + 0.5)
    return ink, r <= c + 0.5


def trigger_position(cfg: TriggerConfig, h: int, w: int,
                     rng: np.random.Generator | None = None) -> tuple[int, int]:
    """Top-left (y, x) of the trigger in an (h, w) image."""
    s = cfg.size
    if s > h or s > w:
        raise ConfigError(f"trigger of size {s} does not fit a {h}x{w} image.")
    if cfg.location == "random":
        if rng is None:
            raise ConfigError("a random trigger location needs a random generator.")
        return int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    y = h - s if cfg.location.startswith("bottom") else 0
    x = w - s if cfg.location.endswith("right") else 0
    return y, x


def stamp(image: np.ndarray, patch: np.ndarray, mask: np.ndarray, y: int, x: int) -> np.ndarray:
    """A copy of ``image`` (H, W, 3) uint8 with the masked patch written at (y, x)."""
    out = image.copy()
    s_h, s_w = mask.shape
    region = out[y: y + s_h, x: x + s_w]
    region[mask] = patch[mask]
    return out


def apply_trigger(image: np.ndarray, cfg: TriggerConfig,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    patch, mask = make_trigger(cfg)
    y, x = trigger_position(cfg, image.shape[0], image.shape[1], rng)
    return stamp(image, patch, mask, y, x)
