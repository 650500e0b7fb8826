"""CLIP pre-training (symmetric InfoNCE, learned logit scale) on an image-caption index,
writing a resumable run directory in the format of the single-modal path (:mod:`ffengine.run`).

As in open_clip's training loop: AdamW with weight decay on matrices only (not on gains,
biases, embeddings' positional tables or the logit scale), the logit scale clamped to
``[0, ln 100]`` after every step, images randomly resized-cropped (scale 0.9-1) to the
model's input size. Augmentations are the batched, counter-RNG ones of
:mod:`ffengine.data.augment` (a view is a function of (seed, sample id, epoch)).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data.augment import AugmentConfig, augment_batch, stream_id
from ..data.index import SampleIndex
from ..data.loader import decode_all
from ..errors import ConfigError, DataError
from ..losses import clip_infonce
from ..models.clip import MAX_LOGIT_SCALE, OBJECTIVE, ClipModel, create_clip, load_clip_model
from ..run import RUN_FORMAT_VERSION, Run, save_checkpoint
from .loop import start_or_resume, train_epochs
from .simclr import PRETRAIN_STREAM


def clip_train_augment(size: int) -> AugmentConfig:
    """open_clip's training transform: RandomResizedCrop(size, scale=(0.9, 1.0)), no flip,
    no colour jitter."""
    return AugmentConfig(size=size, scale=(0.9, 1.0), flip_p=0.0, jitter=(0.0, 0.0, 0.0, 0.0),
                         jitter_p=0.0, gray_p=0.0)


def clip_eval_augment(size: int) -> AugmentConfig:
    """The deterministic view used for scoring and embedding: the centred square crop
    resized to ``size`` (identity on a square image of that size)."""
    return AugmentConfig(size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0,
                         jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.0, gray_p=0.0)


@dataclass(frozen=True)
class ClipPretrainConfig:
    model: str = "ffclip-vit-tiny"  # an open_clip model name (ffengine's or open_clip's)
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    schedule: str = "cosine"  # per-epoch learning rate: constant or cosine
    ckpt_every: int = 5
    seed: int = 0
    init_logit_scale: float = math.log(1 / 0.07)
    bf16: bool = False  # autocast in bf16 (GPU, AMX CPUs); weights stay float32

    def settings(self) -> dict:
        return asdict(self)


def _param_groups(model: ClipModel, weight_decay: float) -> list[dict]:
    """open_clip's rule: no decay on 1-d parameters (gains, biases, logit scale) and on
    positional embeddings / class tokens."""
    decay, no_decay = [], []
    for name, p in model.clip.named_parameters():
        if not p.requires_grad:
            continue
        exclude = (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
                   or "logit_scale" in name or "positional_embedding" in name
                   or "class_embedding" in name)
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def new_clip_manifest(model: ClipModel, augment: AugmentConfig, index: SampleIndex,
                      cfg: ClipPretrainConfig, command: str) -> dict:
    from ..models.clip import default_scored_layers

    manifest = {
        "format_version": RUN_FORMAT_VERSION,
        "objective": {"name": OBJECTIVE, "max_logit_scale": MAX_LOGIT_SCALE,
                      "init_logit_scale": cfg.init_logit_scale},
        "model": model.model_entry(),
        "scored_layers": list(default_scored_layers(model)),
        "augment": augment.to_dict(),
        "index": {"path": str(index.path), "hash": index.hash},
        "training": cfg.settings(),
        "command": command,
        "created_by": f"ffengine {__version__}",
        "checkpoints": [],
    }
    return json.loads(json.dumps(manifest))  # tuples -> lists, as read back from disk


def captions_of(index: SampleIndex, ids: np.ndarray) -> list[str]:
    """The captions of ``ids``; DataError naming the first samples without one."""
    caps = [index.caption(int(i)) for i in ids]
    missing = [int(i) for i, c in zip(ids, caps, strict=True) if c is None]
    if missing:
        raise DataError(f"{len(missing)} sample(s) of {index.path} have no caption (KEY.txt), "
                        f"e.g. ids {missing[:5]}; CLIP pre-training and scoring need "
                        "image-caption pairs (see ffengine.data.captions).")
    return caps


def pretrain_clip(index: SampleIndex, out: str | Path, cfg: ClipPretrainConfig,
                  device: torch.device | str = "cpu", command: str = "",
                  progress: bool = True, max_epochs_this_call: int | None = None) -> Run:
    """Pre-train an open_clip model on ``index`` (image-caption pairs) into run directory
    ``out``; resumes from its last checkpoint when ``out`` holds a run with the same
    settings (only ``epochs`` may change)."""
    if cfg.ckpt_every < 1 or cfg.epochs < 1:
        raise ConfigError("epochs and ckpt_every must be at least 1.")
    device = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = create_clip(cfg.model, seed=cfg.seed)
    with torch.no_grad():
        model.clip.logit_scale.fill_(cfg.init_logit_scale)
    model = model.to(device)
    augment = clip_train_augment(model.image_size)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=(0.9, 0.98), eps=1e-6)
    manifest = new_clip_manifest(model, augment, index, cfg, command)
    manifest, start_epoch, step, train_s = start_or_resume(
        out, manifest, opt,
        lambda run, last: model.load_state_dict(load_clip_model(run, last, device).state_dict()))

    data = decode_all(index)
    if data.skipped:
        manifest["skipped"] = [{"id": i, "reason": r} for i, r in data.skipped]
    tokens = model.tokenize(captions_of(index, data.ids)).to(device)
    images = data.packed.to(device)  # padded per batch, in groups of similar size

    def train_batch(sel: np.ndarray, epoch: int) -> float:
        x = augment_batch(images.select(sel), data.sizes[sel], data.ids[sel], cfg.seed,
                          stream_id(PRETRAIN_STREAM, epoch, 0), augment)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            img = model.encode_image(x)
            txt = model.encode_text(tokens[sel])
        loss = clip_infonce(img.float(), txt.float(), model.logit_scale())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # open_clip's clamp: exp(logit_scale) <= 100
            model.clip.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        return loss.item()

    # every step sees batch_size - 1 negatives (the ragged last batch is dropped)
    train_epochs(cfg, model, opt, len(data), start_epoch, step, max_epochs_this_call,
                 train_batch,
                 lambda epoch, step, lr, t: save_checkpoint(out, manifest, model.clip, opt,
                                                            epoch, step, lr, t),
                 "pretrain clip", progress,
                 postfix=lambda: {"scale": f"{model.logit_scale().item():.1f}"}, train_s=train_s)
    model.eval()
    return Run(out)


__all__ = ["ClipPretrainConfig", "captions_of", "clip_eval_augment", "clip_train_augment",
           "new_clip_manifest", "pretrain_clip"]
