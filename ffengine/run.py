"""The pre-training run directory (DESIGN.md §4)::

    manifest.json                  model config, scored layers, objective, augmentation, the
                                   index and its hash, one entry per checkpoint
    ckpt-EPOCH.safetensors         model state_dict at that checkpoint
    ckpt-EPOCH.optim.pt            optimizer state (Adam moments), loaded with weights_only
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .data.augment import AugmentConfig
from .errors import DataError, ManifestMismatchError
from .io_utils import atomic_path, atomic_write_json
from .models import ModelConfig, SimCLRModel, build_model

MANIFEST = "manifest.json"
RUN_FORMAT_VERSION = 1
DEFAULT_SCORED_LAYERS = ("head.fc1", "head.bn", "head.fc2")


@dataclass(frozen=True)
class Checkpoint:
    epoch: int
    step: int
    lr: float  # mean learning rate over the epochs this checkpoint stands for
    weights: Path
    optimizer: Path | None
    # wall seconds of training behind this checkpoint, summed over resumed calls (None in runs
    # written before it was recorded, or resumed from one)
    train_s: float | None = None


class Run:
    """A run directory opened for reading (scoring) or appending (resumed pre-training)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            raise DataError(f"{self.path} is not a run directory (no {MANIFEST}); create one "
                            "with `ffengine pretrain`.")
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format_version") != RUN_FORMAT_VERSION:
            raise DataError(f"run {self.path} has format version "
                            f"{self.manifest.get('format_version')}; this ffengine reads "
                            f"{RUN_FORMAT_VERSION}.")

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model"])

    @property
    def augment(self) -> AugmentConfig:
        return AugmentConfig.from_dict(self.manifest["augment"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["objective"]["temperature"])

    @property
    def index_hash(self) -> str:
        return self.manifest["index"]["hash"]

    @property
    def scored_layers(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("scored_layers", DEFAULT_SCORED_LAYERS))

    @property
    def checkpoints(self) -> list[Checkpoint]:
        return [
            Checkpoint(c["epoch"], c["step"], float(c["lr"]), self.path / c["weights"],
                       (self.path / c["optimizer"]) if c.get("optimizer") else None,
                       c.get("train_s"))
            for c in self.manifest["checkpoints"]
        ]

    def check_index(self, index_hash: str, index_path: str | Path) -> None:
        """Refuse an index whose content differs from the one the run was trained on."""
        if index_hash != self.index_hash:
            raise ManifestMismatchError(
                f"index {index_path} has hash {index_hash[:16]}…, but run {self.path} was "
                f"pre-trained on an index with hash {self.index_hash[:16]}… "
                f"({self.manifest['index'].get('path')}). Score the data the run was trained "
                "on, or re-run `ffengine pretrain` on this index.")

    def load_model(self, ckpt: Checkpoint, device: torch.device | str = "cpu") -> SimCLRModel:
        model = build_model(self.model_config)
        try:
            state = load_file(str(ckpt.weights), device=str(device))
        except Exception as e:  # safetensors raises its own error types
            raise DataError(f"cannot read checkpoint {ckpt.weights} ({e}).") from e
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ManifestMismatchError(
                f"checkpoint {ckpt.weights} does not fit the manifest's model config "
                f"{self.manifest['model']}: {e}") from e
        return model.to(device).eval()


def new_manifest(model: ModelConfig, augment: AugmentConfig, index_path: str, index_hash: str,
                 temperature: float, settings: dict, command: str) -> dict:
    return {
        "format_version": RUN_FORMAT_VERSION,
        "objective": {"name": "nt_xent", "temperature": temperature},
        "model": model.to_dict(),
        "scored_layers": list(DEFAULT_SCORED_LAYERS),
        "augment": augment.to_dict(),
        "index": {"path": str(index_path), "hash": index_hash},
        "training": settings,
        "command": command,
        "created_by": f"ffengine {__version__}",
        "checkpoints": [],
    }


def save_checkpoint(run_dir: Path, manifest: dict, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, epoch: int, step: int,
                    lr: float, train_s: float | None = None) -> None:
    """Write the weights (and optimizer state), then the manifest entry, each atomically: a
    crash leaves either the previous manifest or the new one, never a dangling entry.
    ``train_s``: the training wall seconds behind this checkpoint (recorded when known)."""
    name = f"ckpt-{epoch:04d}"
    with atomic_path(run_dir / f"{name}.safetensors") as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp))
    entry = {"epoch": epoch, "step": step, "lr": lr, "weights": f"{name}.safetensors"}
    if train_s is not None:
        entry["train_s"] = round(float(train_s), 1)
    if optimizer is not None:
        with atomic_path(run_dir / f"{name}.optim.pt") as tmp:
            torch.save(optimizer.state_dict(), tmp)
        entry["optimizer"] = f"{name}.optim.pt"
    manifest["checkpoints"] = [c for c in manifest["checkpoints"] if c["epoch"] != epoch]
    manifest["checkpoints"].append(entry)
    atomic_write_json(run_dir / MANIFEST, manifest)
