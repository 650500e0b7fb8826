"""CLIP scoring (DESIGN.md §2, CLIP): the objective plug-in of the Engine.

Per pair ``(x_i, c_i)`` of a scoring batch of B pairs, with the checkpoint's logit scale
``s`` (exp, clamped at 100), image embeddings ``e`` and caption embeddings (constants)::

    ℓ_pre(x_i) = ½[CE(image_i → texts) + CE(text_i → images)]

with the gradient reaching the scored visual parameters only through ``e_i``. The fast
path: one forward of the batch and one backward of ``Σ_i ℓ_pre(x_i)``
(:func:`ffengine.losses.clip_per_sample_sum`) put each sample's own ``δ_i = ∂ℓ_pre/∂e_i`` on
its row; with the input rows ``h_i`` of the projection, the ghost algebra
(:func:`ffengine.ops.ghost_score`, V = 1 view) gives ``⟨G, g_i⟩`` and ``‖g_i‖²`` without
forming ``g_i``. For the default scored layer (the final projection) the tower runs without
an autograd graph: ``δ`` needs only the embeddings. A scored Linear inside the tower runs the
tower with a graph and treats its tokens as the views.

:class:`ClipObjective` is what the Engine calls (:mod:`ffengine.engine.objective`), so CLIP
runs are scored, traced, resumed and sharded exactly like SimCLR runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.augment import augment_batch, stream_id
from ..data.index import SampleIndex
from ..data.packed import Images
from ..errors import ConfigError
from ..losses import clip_per_sample_sum
from ..models.clip import (
    ClipModel,
    ScoredLinear,
    linear_layout_grads,
    load_clip_model,
    scored_linears,
    visual_split,
)
from ..ops.ghost_score import ghost_score
from ..pretrain.clip import captions_of, clip_eval_augment
from ..reference.clip_scoring import score_clip_batch_reference
from ..run import Checkpoint, Run
from .head import normalized_scores
from .simclr_objective import SCORE_STREAM


@dataclass
class ClipSignal:
    """One scored layer's rows for a batch of B samples: ``inp`` (B, V, d_in) and ``delta``
    (B, V, d_out); V = 1 for the final projection, the token count inside the tower."""

    layer: ScoredLinear
    inp: torch.Tensor
    delta: torch.Tensor


def model_inputs(model: ClipModel, images: Images, sizes: np.ndarray, ids: np.ndarray,
                 seed: int = 0, stream: int = 0) -> torch.Tensor:
    """Decoded images (padded (B, 3, Hmax, Wmax) uint8 or [0, 1] float, or packed) -> the
    model's deterministic input view (B, 3, S, S) float in [0, 1] (centred square crop
    resized to the model's image size)."""
    return augment_batch(images, sizes, ids, seed, stream, clip_eval_augment(model.image_size))


def instance_inputs(model: ClipModel, x: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """K (3, H, W) [0, 1] images -> K (3, S, S) model inputs."""
    out = []
    for t in x:
        sizes = np.array([[t.shape[1], t.shape[2]]])
        x = model_inputs(model, t.unsqueeze(0), sizes, np.zeros(1, np.int64))[0]
        out.append(x.to(t.dtype))
    return out


def clip_cosine_gradients(model: ClipModel, x_b: Sequence[torch.Tensor],
                          x_r: Sequence[torch.Tensor], layers: Sequence[str] | None = None
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Stacked cosine gradients of K instances: ``G_k = ∇_θ -cos(f(x_b), f(x_r))`` with
    ``f`` = open_clip's image embedding, over the scored layers, in Linear layout.

    x_b, x_r: K model-input images (3, S, S) in [0, 1] each. Returns
    ({parameter name: (K, *linear shape)}, cos (K,)).
    """
    if model.training:
        raise ConfigError("cosine gradients need the model in eval mode.")
    lins = scored_linears(model, layers)
    params = [p for s in lins for p in s.params()]
    per_k, cos_values = [], []
    for xb, xr in zip(x_b, x_r, strict=True):
        with torch.enable_grad():
            e = model.encode_image(torch.stack([xb, xr]))
            cos = F.cosine_similarity(e[:1], e[1:], dim=1).squeeze(0)
            g = torch.autograd.grad(-cos, params, allow_unused=True)
        per_k.append(linear_layout_grads(lins, g))
        cos_values.append(cos.detach())
    names = [n for s in lins for n in s.param_names()]
    stacked = {n: torch.stack([g[j] for g in per_k]).contiguous()
               for j, n in enumerate(names)}
    return stacked, torch.stack(cos_values)


def clip_signals(model: ClipModel, x: torch.Tensor, txt: torch.Tensor,
                 layers: Sequence[ScoredLinear], scale: torch.Tensor | float
                 ) -> list[ClipSignal]:
    """Per-sample rows ``(h, δ)`` of every scored layer for a batch (one backward).

    x: (B, 3, S, S) model inputs in [0, 1]; txt: (B, embed_dim) caption embeddings
    (constants); scale: exp(logit_scale). The model must be in eval mode (BatchNorm of a
    ModifiedResNet then treats every image on its own).
    """
    if model.training:
        raise ConfigError("the model must be in eval mode for per-sample scoring.")
    txt = txt.detach()
    if all(s.is_final_projection for s in layers):  # the fast path: no graph in the tower
        with torch.no_grad():
            h, e = visual_split(model, x)
        with torch.enable_grad():
            e = e.detach().requires_grad_(True)
            (delta,) = torch.autograd.grad(clip_per_sample_sum(e, txt, scale), [e])
        return [ClipSignal(s, h.unsqueeze(1), delta.detach().unsqueeze(1)) for s in layers]

    captured: dict[str, dict[str, torch.Tensor]] = {}
    handles = []

    def hook_for(name: str):
        def hook(m, args, out):
            captured[name] = {"inp": args[0], "out": out}
        return hook

    for s in layers:
        if s.kind == "linear":
            handles.append(s.module.register_forward_hook(hook_for(s.name)))
    try:
        with torch.enable_grad():
            h, e = visual_split(model, x.detach().requires_grad_(True))
            missing = [s.name for s in layers if s.kind == "linear" and s.name not in captured]
            if missing:
                raise ConfigError(f"scored layers {missing} were not called as modules in the "
                                  "visual forward; score the final projection or a Linear "
                                  "the tower calls.")
            outs = [e if s.is_final_projection else captured[s.name]["out"] for s in layers]
            deltas = torch.autograd.grad(clip_per_sample_sum(e, txt, scale), outs)
    finally:
        for hd in handles:
            hd.remove()
    signals = []
    B = len(x)
    for s, d in zip(layers, deltas, strict=True):
        inp = h if s.is_final_projection else captured[s.name]["inp"]
        # rows are batch-first: (B, ..., d) -> (B, V, d), V = tokens
        signals.append(ClipSignal(s, inp.detach().reshape(B, -1, inp.shape[-1]),
                                  d.detach().reshape(B, -1, d.shape[-1])))
    return signals


def clip_ghost_terms(signals: Sequence[ClipSignal], grads: dict[str, torch.Tensor],
                     backend: str | None = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed over scored layers: dots (B, K) with the stacked cosine gradients and the
    squared norms (B,) of the per-sample gradients."""
    dots, sq = None, None
    for s in signals:
        h, d = s.inp, s.delta
        G_w = grads[f"{s.layer.name}.weight"].to(h.dtype)
        G_b = grads.get(f"{s.layer.name}.bias")
        G_b = G_b.to(h.dtype) if G_b is not None else None
        dd, ss = ghost_score(h.contiguous(), d.contiguous(), G_w, G_b, backend=backend)
        dots = dd if dots is None else dots + dd
        sq = ss if sq is None else sq + ss
    return dots, sq


class ClipObjective:
    """The CLIP objective of a run (see :mod:`ffengine.engine.objective`)."""

    name = "clip_infonce"
    views = 1
    draws_matter = False  # the scoring view is deterministic
    needs_captions = True  # an image without a readable caption is skipped, not scored
    compilable = False  # the visual tower runs in pieces (visual_split): eager

    def __init__(self, run: Run):
        self.run = run
        self.layers = tuple(run.manifest.get("scored_layers") or ())

    def load_model(self, ckpt: Checkpoint, device: torch.device | str = "cpu") -> ClipModel:
        return load_clip_model(self.run, ckpt, device)

    def cosine_gradients(self, model: ClipModel, x_b: Sequence[torch.Tensor],
                         x_r: Sequence[torch.Tensor]
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return clip_cosine_gradients(model, instance_inputs(model, x_b),
                                     instance_inputs(model, x_r), self.layers)

    def text_embeddings(self, model: ClipModel, index: SampleIndex, ids: np.ndarray,
                        device: torch.device) -> torch.Tensor:
        tokens = model.tokenize(captions_of(index, ids)).to(device)
        with torch.no_grad():
            return model.encode_text(tokens)

    def score_batch(self, model: ClipModel, index: SampleIndex, images: Images,
                    sizes: np.ndarray, ids: np.ndarray, grads: dict[str, torch.Tensor], *,
                    seed: int = 0, epoch: int = 0, draw: int = 0,
                    backend: str | None = "auto", reference: bool = False) -> torch.Tensor:
        """(B, K) normalized scores of one scoring batch (see the module docstring)."""
        x = model_inputs(model, images, sizes, ids, seed, stream_id(SCORE_STREAM, epoch, draw, 0))
        param = next(model.parameters())
        x = x.to(param.dtype)
        txt = self.text_embeddings(model, index, ids, x.device)
        with torch.no_grad():
            scale = model.logit_scale()
        if reference:
            return score_clip_batch_reference(model, x, txt, grads, self.layers, scale)
        sig = clip_signals(model, x, txt, scored_linears(model, self.layers), scale)
        dots, sq = clip_ghost_terms(sig, grads, backend)
        return normalized_scores(dots, sq)


__all__ = ["ClipObjective", "ClipSignal", "clip_cosine_gradients", "clip_ghost_terms",
           "clip_signals", "instance_inputs", "model_inputs"]
