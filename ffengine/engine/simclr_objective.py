"""SimCLR's objective as the Engine sees it (:mod:`ffengine.engine.objective`): two
augmented views per sample, NT-Xent with the other batch members as constant negatives,
scored layers in the projection head."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data.augment import augment_batch, stream_id
from ..data.packed import Images
from ..models import SimCLRModel
from ..models.resnet import fold_batchnorm
from ..options import PRECISIONS
from ..reference.scoring import score_batch_reference
from ..run import Checkpoint, Run
from .compiled_backbone import BackboneRunner, ColourRunner
from .cosine import cosine_gradients
from .head import ghost_terms, head_signals, normalized_scores, scored_modules

SCORE_STREAM = 1  # purpose tag of scoring views in the augmentation streams (pre-training: 0)
# On a CPU, view pixels per backbone forward: 64 views of 32x32. Larger forwards allocate
# activations above glibc's mmap threshold (32 MiB at most), and each such tensor is mapped,
# zeroed page by page by the kernel and unmapped again on every forward: with the 256-view
# forwards used until 2026-12-04 a fifth of an engine pass's CPU time went to the kernel, and
# 64-view forwards ran the demo's eager backbone 1.3x faster (the engine 1.25x), ResNet-18's
# 1.08x, on the 2-core dev VM (bench/experiments/backbone_batch_ab.py; bench/README.md).
CPU_BACKBONE_PIXELS = 64 * 32 * 32
# views per backbone forward on a GPU, at least (large views: see GPU_BACKBONE_PIXELS)
GPU_BACKBONE_BATCH = 512
# On a GPU, view pixels per score_batch call (scoring batches fused: 4,096 samples of 32x32
# views) and per backbone forward (2,048 32x32 views): one call's kernels launch once for
# many scoring batches. An H200 ran the demo's model at 0.30x plain inference with one
# 256-sample batch per call, bound by 450 launches per batch from one host thread
# (bench/README.md, "GPU, second session"); a CPU gains nothing from it. Bounded in pixels so
# that large views (224x224: no fusion, 512-view forwards) keep the memory of one batch.
GPU_FUSED_PIXELS = 4096 * 32 * 32
GPU_BACKBONE_PIXELS = 2048 * 32 * 32


def backbone_batch(device: torch.device | str, size: int = 32) -> int:
    """Views of ``size`` x ``size`` pixels per backbone forward on ``device``: 64 of 32x32
    on a CPU (one for 224x224), 2,048 on a GPU (512 at least)."""
    if torch.device(device).type != "cuda":
        return max(1, CPU_BACKBONE_PIXELS // (size * size))
    return max(GPU_BACKBONE_BATCH, GPU_BACKBONE_PIXELS // (size * size))


def backbone_memory_format(device: torch.device | str) -> torch.memory_format:
    """The backbone's memory format on ``device``: channels-last everywhere.

    cuDNN's convolutions are fastest in it. On the 2-core AMD EPYC dev machine (AVX2, float32,
    2026-12-04) the eager backbone ran 1.54x (the demo's model) and 1.36x (ResNet-18) faster
    in it than NCHW, batch 512 under inference_mode, outputs within 5e-7 relative; compiled,
    both layouts gave the same outputs bit for bit at the same speed (Inductor picks its own).
    (Until then CPU passes ran NCHW, on an unrecorded measurement.)"""
    del device  # one answer today; the argument keeps the per-device question in one place
    return torch.channels_last


class SimclrObjective:
    name = "nt_xent"
    views = 2
    draws_matter = True  # every draw is a new pair of augmented views
    needs_captions = False
    # the backbone is one module: BackboneRunner may compile it (and ColourRunner the views'
    # colour stage)
    compilable = True

    # the backbone may run under bf16 autocast (the head's maths stays float32)
    precisions = PRECISIONS

    def __init__(self, run: Run):
        self.run = run
        self.precision = "float32"
        self.layers = run.scored_layers
        self.temperature = run.temperature
        self.augment = run.augment
        # the Engine swaps in its choice of both (compiled together)
        self.backbone = BackboneRunner(compiled=False)
        self.colour = ColourRunner(compiled=False)

    def load_model(self, ckpt: Checkpoint, device: torch.device | str = "cpu") -> SimCLRModel:
        model = self.run.load_model(ckpt, device)
        # channels-last: see backbone_memory_format (new pre-training runs use it too)
        return model.to(memory_format=backbone_memory_format(device))

    def scoring_model(self, model: SimCLRModel) -> SimCLRModel:
        """The fast path's form of a loaded model: the backbone's batch norms folded into its
        convolutions (:func:`~ffengine.models.resnet.fold_batchnorm`; features within float32
        rounding); the head, whose layers are scored, untouched."""
        model.backbone = fold_batchnorm(model.backbone).to(
            memory_format=backbone_memory_format(next(model.parameters()).device))
        return model

    def cosine_gradients(self, model: SimCLRModel, x_b: Sequence[torch.Tensor],
                         x_r: Sequence[torch.Tensor]):
        return cosine_gradients(model, x_b, x_r, self.layers)

    def fused_samples(self, device: torch.device | str) -> int:
        """Samples per :meth:`score_batch` call on ``device`` (several scoring batches,
        ``groups``) where fusing pays: on a GPU, 4,096 for 32x32 views, fewer for larger."""
        if torch.device(device).type != "cuda":
            return 1
        return max(1, GPU_FUSED_PIXELS // (self.augment.size * self.augment.size))

    def view_features(self, model: SimCLRModel, images: Images, sizes: np.ndarray,
                      ids: np.ndarray, seed: int, epoch: int, draw: int) -> torch.Tensor:
        """(2B, d) backbone features of both views (view-major rows), no autograd graph."""
        out = []
        bf16 = self.precision == "bfloat16"
        with torch.no_grad():
            for v in (0, 1):
                x = augment_batch(images, sizes, ids, seed,
                                  stream_id(SCORE_STREAM, epoch, draw, v), self.augment,
                                  colour=self.colour)
                x = x.contiguous(memory_format=backbone_memory_format(x.device))
                step = backbone_batch(x.device, x.shape[-1])
                with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                    out += [self.backbone(model, x[s: s + step]).float()
                            for s in range(0, len(x), step)]
        return torch.cat(out)

    def score_batch(self, model: SimCLRModel, index, images: Images, sizes: np.ndarray,
                    ids: np.ndarray, grads: dict[str, torch.Tensor], *, seed: int, epoch: int,
                    draw: int, backend: str | None, reference: bool,
                    groups: int = 1) -> torch.Tensor:
        """See :class:`~ffengine.engine.objective.Objective`; ``groups``: the samples are
        that many scoring batches of equal size, consecutive, each its own negatives
        (one call for all: fewer kernel launches on a GPU). Not with ``reference``."""
        feats = self.view_features(model, images, sizes, ids, seed, epoch, draw)
        if reference:
            if groups != 1:
                raise ValueError("the reference scores one scoring batch per call.")
            return score_batch_reference(model, feats, grads, self.layers, self.temperature)
        sig = head_signals(model.head, feats, scored_modules(model, self.layers),
                           self.temperature, groups)
        dots, sq = ghost_terms(sig, grads, views=2, backend=backend)
        return normalized_scores(dots, sq)
