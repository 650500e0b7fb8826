"""Slow, obviously correct CLIP scoring of one batch (DESIGN.md §2): open_clip's own forward
with a full autograd graph, one ``ℓ_pre(x_i)`` per sample (other images and all texts
detached), the per-sample gradient ``g_i`` materialized over the scored parameters, then
``⟨G, g_i⟩ / ‖g_i‖``. The ground truth of :func:`ffengine.engine.clip_objective.clip_signals`
and the ghost algebra."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..losses import clip_sample_loss
from ..models.clip import ClipModel, linear_layout_grads, scored_linears


def score_clip_batch_reference(model: ClipModel, x: torch.Tensor, txt: torch.Tensor,
                               grads: dict[str, torch.Tensor], layers: Sequence[str],
                               scale: torch.Tensor | float) -> torch.Tensor:
    """Scores (B, K) of B image-caption pairs.

    x: (B, 3, S, S) model-input images in [0, 1]; txt: (B, embed_dim) their captions' text
    embeddings; grads: stacked cosine gradients {name: (K, ...)} in Linear layout
    (``visual.proj.weight`` is (embed_dim, width)); scale: exp(logit_scale).
    """
    lins = scored_linears(model, layers)
    params = [p for s in lins for p in s.params()]
    names = [n for s in lins for n in s.param_names()]
    G = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], 1)
    out = x.new_zeros((len(x), G.shape[0]), dtype=G.dtype)
    with torch.enable_grad():
        e = model.encode_image(x)
        for i in range(len(x)):
            loss = clip_sample_loss(e, txt, i, scale)
            g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            per_layer = linear_layout_grads(lins, g)
            g_flat = torch.cat([t.reshape(-1) for t in per_layer]).to(G.dtype)
            norm = torch.linalg.vector_norm(g_flat)
            if norm > 0:
                out[i] = (G @ g_flat) / norm
    return out


__all__ = ["score_clip_batch_reference"]
