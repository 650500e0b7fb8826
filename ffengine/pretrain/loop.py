"""The epoch loop SimCLR and CLIP pre-training share: the learning rate per epoch, one seeded
permutation per epoch, full batches only, a checkpoint every ``ckpt_every`` epochs and at
the last, each carrying the mean learning rate of the epochs it stands for (Eq. 5's α_t)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, ManifestMismatchError
from ..heap import heap_retained
from ..io_utils import atomic_write_json
from ..run import MANIFEST, Run


def epoch_lr(cfg, epoch: int) -> float:
    """Learning rate in force during ``epoch`` (1-based) of a config with ``lr``, ``epochs``
    and ``schedule`` (constant or cosine)."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs))
    raise ConfigError(f"schedule {cfg.schedule!r} is unknown; expected constant or cosine.")


def train_epochs(cfg, model: torch.nn.Module, opt: torch.optim.Optimizer, n: int,
                 start_epoch: int, step: int, max_epochs_this_call: int | None,
                 train_batch: Callable[[np.ndarray, int], float],
                 save: Callable[[int, int, float, float | None], None], desc: str,
                 progress: bool, postfix: Callable[[], dict] | None = None,
                 train_s: float | None = 0.0) -> int:
    """Train from ``start_epoch`` (1-based) to ``cfg.epochs`` (at most
    ``max_epochs_this_call`` of them) over ``n`` samples; returns the step count after them.

    ``train_batch(sel, epoch)`` takes one optimizer step on the samples at positions ``sel``
    and returns its loss; ``save(epoch, step, mean_lr, train_s)`` writes a checkpoint, with
    the training wall seconds behind it: ``train_s`` (those before ``start_epoch``, None if
    unknown) plus this call's epochs, so a resumed run reports its whole training time, not
    the part after the resume. The ragged last batch is dropped: BatchNorm and the number of
    negatives stay the same every step.
    """
    end_epoch = cfg.epochs if max_epochs_this_call is None else min(
        cfg.epochs, start_epoch - 1 + max_epochs_this_call)
    epochs = range(start_epoch, end_epoch + 1)
    bs = min(cfg.batch_size, n)
    n_batches = n // bs
    lrs_since_ckpt: list[float] = []
    bar = tqdm(epochs, desc=desc, unit="epoch", disable=not progress,
               initial=epochs.start - 1, total=cfg.epochs)
    on_cpu = next(model.parameters()).device.type == "cpu"
    # on a CPU the steps' large activations would otherwise be mapped and zeroed anew each step
    with heap_retained() if on_cpu else contextlib.nullcontext():
        for epoch in bar:
            lr = epoch_lr(cfg, epoch)
            for g in opt.param_groups:
                g["lr"] = lr
            lrs_since_ckpt.append(lr)
            model.train()
            perm = np.random.default_rng([cfg.seed, epoch]).permutation(n)
            t0, total = time.perf_counter(), 0.0
            for b in range(n_batches):
                total += train_batch(perm[b * bs: (b + 1) * bs], epoch)
                step += 1
            if train_s is not None:
                train_s += time.perf_counter() - t0
            bar.set_postfix(loss=f"{total / max(n_batches, 1):.3f}",
                            **(postfix() if postfix else {}),
                            ips=f"{n_batches * bs / (time.perf_counter() - t0):.0f}")
            if epoch % cfg.ckpt_every == 0 or epoch == cfg.epochs:
                save(epoch, step, float(np.mean(lrs_since_ckpt)), train_s)
                lrs_since_ckpt = []
    return step


def check_resumable(run: Run, fresh: dict, out: Path) -> None:
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


def start_or_resume(out: Path, manifest: dict, opt: torch.optim.Optimizer,
                    load_weights: Callable) -> tuple[dict, int, int, float | None]:
    """``(manifest, first epoch to train, steps so far, training seconds so far)``. Where
    ``out`` holds no run, the fresh ``manifest`` is written there; else the run's settings
    must match it (only the epoch count may change) and the last checkpoint's weights
    (``load_weights(run, ckpt)``) and optimizer state are loaded. The seconds are None for a
    run whose last checkpoint did not record them."""
    if not (out / MANIFEST).exists():
        atomic_write_json(out / MANIFEST, manifest)
        return manifest, 1, 0, 0.0
    run = Run(out)
    check_resumable(run, manifest, out)
    if not run.checkpoints:
        return run.manifest, 1, 0, 0.0
    last = run.checkpoints[-1]
    load_weights(run, last)
    if last.optimizer is not None:
        opt.load_state_dict(torch.load(last.optimizer, weights_only=True))
    return run.manifest, last.epoch + 1, last.step, last.train_s


__all__ = ["check_resumable", "epoch_lr", "start_or_resume", "train_epochs"]
