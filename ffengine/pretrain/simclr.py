"""SimCLR pre-training on a sample index, writing a resumable run directory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.augment import AugmentConfig, augment_batch, stream_id
from ..data.index import SampleIndex
from ..data.loader import decode_all
from ..errors import ConfigError
from ..losses import nt_xent
from ..models import MODEL_PRESETS, ModelConfig, build_model
from ..run import Run, new_manifest, save_checkpoint
from .loop import start_or_resume, train_epochs

PRETRAIN_STREAM = 0  # purpose tag in the augmentation streams (scoring uses others)

# The backbone's memory format while training, recorded in the run's manifest. Channels-last
# on every device: on the 2-core AMD EPYC dev machine (AVX2, float32, 2026-12-04) a training
# step ran 1.32-1.52x faster than NCHW on the small model (two threads; 1.47x on one) and
# 1.19x on ResNet-18. Runs started before then trained NCHW on CPU unless under bf16; a
# resumed run keeps the format it started with, so that it equals an uninterrupted one.
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
NEW_RUN_MEMORY_FORMAT = "channels_last"


def run_memory_format(manifest: dict, bf16: bool, device: torch.device) -> str:
    """The memory format a run trains in: the one its manifest records, else (a run started
    before formats were recorded) channels-last only under bf16 or on CUDA, as it began."""
    recorded = manifest.get("memory_format")
    if recorded is not None:
        if recorded not in MEMORY_FORMATS:
            raise ConfigError(f"the run's manifest records memory_format {recorded!r}; "
                              f"expected one of {sorted(MEMORY_FORMATS)}.")
        return recorded
    return "channels_last" if bf16 or device.type == "cuda" else "contiguous"


@dataclass(frozen=True)
class PretrainConfig:
    model: str | ModelConfig = "small"
    epochs: int = 75
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    schedule: str = "constant"  # or "cosine"
    temperature: float = 0.5
    ckpt_every: int = 15
    seed: int = 0
    # bf16 autocast (weights and optimizer stay float32): faster only where the CPU has
    # bf16 units (AMX, AVX512-BF16) or on GPU; measured 2x slower on AVX512F-only Xeons.
    bf16: bool = False
    augment: AugmentConfig = AugmentConfig()

    def model_config(self) -> ModelConfig:
        if isinstance(self.model, ModelConfig):
            return self.model
        if self.model not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {self.model!r}; expected one of "
                              f"{sorted(MODEL_PRESETS)}.")
        return MODEL_PRESETS[self.model]

    def settings(self) -> dict:
        d = asdict(self)
        d.pop("augment")
        d["model"] = self.model if isinstance(self.model, str) else "custom"
        return d


def pretrain(index: SampleIndex, out: str | Path, cfg: PretrainConfig,
             device: torch.device | str = "cpu", command: str = "", progress: bool = True,
             max_epochs_this_call: int | None = None) -> Run:
    """Pre-train SimCLR on ``index`` into run directory ``out``; resumes from its last
    checkpoint when ``out`` already holds a run with the same settings."""
    if cfg.ckpt_every < 1 or cfg.epochs < 1:
        raise ConfigError("epochs and ckpt_every must be at least 1.")
    device = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mcfg = cfg.model_config()
    with torch.random.fork_rng(devices=[]):  # the seed fixes the init, not global state
        torch.manual_seed(cfg.seed)
        model = build_model(mcfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    manifest = new_manifest(mcfg, cfg.augment, str(index.path), index.hash, cfg.temperature,
                            cfg.settings(), command)
    manifest["memory_format"] = NEW_RUN_MEMORY_FORMAT
    manifest = json.loads(json.dumps(manifest))  # tuples -> lists, as read back from disk
    manifest, start_epoch, step, train_s = start_or_resume(
        out, manifest, opt,
        lambda run, last: model.load_state_dict(run.load_model(last, device).state_dict()))
    # a run resumed from before formats were recorded keeps its own, and records it from now
    manifest["memory_format"] = run_memory_format(manifest, cfg.bf16, device)
    fmt = MEMORY_FORMATS[manifest["memory_format"]]
    model = model.to(memory_format=fmt)  # in place: the optimizer keeps the same parameters

    data = decode_all(index)
    if data.skipped:
        manifest["skipped"] = [{"id": i, "reason": r} for i, r in data.skipped]
    images = data.packed.to(device)  # padded per batch, in groups of similar size

    def train_batch(sel: np.ndarray, epoch: int) -> float:
        ids = data.ids[sel]
        views = [augment_batch(images.select(sel), data.sizes[sel], ids, cfg.seed,
                               stream_id(PRETRAIN_STREAM, epoch, v), cfg.augment)
                 for v in (0, 1)]
        x = torch.cat(views).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            z = model(x)
        loss = nt_xent(z.float(), cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    train_epochs(cfg, model, opt, len(data), start_epoch, step, max_epochs_this_call,
                 train_batch,
                 lambda epoch, step, lr, t: save_checkpoint(out, manifest, model, opt, epoch,
                                                            step, lr, t),
                 "pretrain", progress, train_s=train_s)
    return Run(out)
