"""Backdoor instances ``(x_b, x_r)``: finding, saving and loading them.

An instance directory holds ``x_b.png``, ``x_r.png`` and ``instance.json`` (where each
image came from and the cosine of their embeddings under the final checkpoint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..io_utils import atomic_path, atomic_write_json


@dataclass
class Instance:
    x_b: np.ndarray  # (H, W, 3) uint8
    x_r: np.ndarray
    meta: dict = field(default_factory=dict)

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensor(self.x_b, device), to_tensor(self.x_r, device)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, img in (("x_b", self.x_b), ("x_r", self.x_r)):
            with atomic_path(path / f"{name}.png") as tmp:
                Image.fromarray(img).save(tmp, format="PNG")
        atomic_write_json(path / "instance.json", self.meta)
        return path


def save_instances(instances: list[Instance], root: str | Path) -> list[str]:
    """Save several instances as ``root/00``, ``root/01``, ...; returns their paths (what
    ``trace(instance_paths=...)`` and ``ffengine trace --instance`` take)."""
    paths = [str(Path(root) / f"{i:02d}") for i in range(len(instances))]
    for inst, path in zip(instances, paths, strict=True):
        inst.save(path)
    return paths


def load_instance(path: str | Path) -> Instance:
    path = Path(path)
    try:
        x_b = np.array(Image.open(path / "x_b.png").convert("RGB"))
        x_r = np.array(Image.open(path / "x_r.png").convert("RGB"))
        meta = json.loads((path / "instance.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a readable backdoor instance ({e}); expected x_b.png, "
                        "x_r.png and instance.json as `ffengine instance` writes them.") from e
    return Instance(x_b, x_r, meta)


def to_tensor(img: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255).to(
        device)
