"""SimCLR pre-training on a sample index, writing a resumable run directory."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.augment import AugmentConfig, augment_batch, stream_id
from ..data.index import SampleIndex
from ..data.loader import decode_all
from ..errors import ConfigError, ManifestMismatchError
from ..losses import nt_xent
from ..models import MODEL_PRESETS, ModelConfig, build_model
from ..run import MANIFEST, Run, new_manifest, save_checkpoint

PRETRAIN_STREAM = 0  # purpose tag in the augmentation streams (scoring uses others)


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


def epoch_lr(cfg: PretrainConfig, epoch: int) -> float:
    """Learning rate in force during ``epoch`` (1-based)."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs))
    raise ConfigError(f"schedule {cfg.schedule!r} is unknown; expected constant or cosine.")


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
    fmt = torch.channels_last if cfg.bf16 or device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    manifest = new_manifest(mcfg, cfg.augment, str(index.path), index.hash, cfg.temperature,
                            cfg.settings(), command)
    manifest = json.loads(json.dumps(manifest))  # tuples -> lists, as read back from disk
    start_epoch, step = 1, 0
    if (out / MANIFEST).exists():
        run = Run(out)
        _check_resumable(run, manifest, out)
        manifest = run.manifest
        if run.checkpoints:
            last = run.checkpoints[-1]
            model.load_state_dict(run.load_model(last, device).state_dict())
            if last.optimizer is not None:
                opt.load_state_dict(torch.load(last.optimizer, weights_only=True))
            start_epoch, step = last.epoch + 1, last.step
    else:
        from ..io_utils import atomic_write_json

        atomic_write_json(out / MANIFEST, manifest)

    data = decode_all(index)
    if data.skipped:
        manifest["skipped"] = [{"id": i, "reason": r} for i, r in data.skipped]
    images = data.images.to(device)
    n = len(data)
    bs = min(cfg.batch_size, n)
    n_batches = n // bs  # drop the ragged last batch: BatchNorm and the negatives stay sane
    end_epoch = cfg.epochs if max_epochs_this_call is None else min(
        cfg.epochs, start_epoch - 1 + max_epochs_this_call)
    lrs_since_ckpt: list[float] = []
    bar = tqdm(range(start_epoch, end_epoch + 1), desc="pretrain", unit="epoch",
               disable=not progress, initial=start_epoch - 1, total=cfg.epochs)
    for epoch in bar:
        lr = epoch_lr(cfg, epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        lrs_since_ckpt.append(lr)
        model.train()
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        t0, total = time.perf_counter(), 0.0
        for b in range(n_batches):
            sel = perm[b * bs: (b + 1) * bs]
            ids = data.ids[sel]
            views = [augment_batch(images[sel], data.sizes[sel], ids, cfg.seed,
                                   stream_id(PRETRAIN_STREAM, epoch, v), cfg.augment)
                     for v in (0, 1)]
            x = torch.cat(views).contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                z = model(x)
            loss = nt_xent(z.float(), cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total += loss.item()
        bar.set_postfix(loss=f"{total / max(n_batches, 1):.3f}",
                        ips=f"{n_batches * bs / (time.perf_counter() - t0):.0f}")
        if epoch % cfg.ckpt_every == 0 or epoch == cfg.epochs:
            save_checkpoint(out, manifest, model, opt, epoch, step,
                            float(np.mean(lrs_since_ckpt)))
            lrs_since_ckpt = []
    return Run(out)


def _check_resumable(run: Run, fresh: dict, out: Path) -> None:
    for key in ("model", "augment", "index", "objective"):
        if run.manifest.get(key) != fresh[key]:
            raise ManifestMismatchError(
                f"{out} holds a run with a different {key}: {json.dumps(run.manifest.get(key))} "
                f"there, {json.dumps(fresh[key])} asked for. Use a new output directory or the "
                "same settings to resume.")
    old = {k: v for k, v in run.manifest.get("training", {}).items() if k != "epochs"}
    new = {k: v for k, v in fresh["training"].items() if k != "epochs"}
    if old != new:
        raise ManifestMismatchError(
            f"{out} holds a run with training settings {old}, asked for {new}; only the epoch "
            "count may change on resume. Use a new output directory.")
    run.manifest["training"]["epochs"] = fresh["training"]["epochs"]
