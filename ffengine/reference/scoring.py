"""Slow, obviously correct scoring of one batch: per-sample autograd on the full head,
materialized per-sample gradients ``g_i``, then ``⟨G, g_i⟩ / ‖g_i‖`` (DESIGN.md §2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..engine.head import scored_parameters
from ..losses import nt_xent_sample_loss


def score_batch_reference(model: nn.Module, feats: torch.Tensor, grads: dict[str, torch.Tensor],
                          layers: Sequence[str], temperature: float) -> torch.Tensor:
    """Scores (B, K) of the B samples whose 2B view features are ``feats`` (view-major rows:
    ``i`` and ``B + i``), against the stacked cosine gradients ``grads`` (name -> (K, ...)).
    ``model.head`` is evaluated in eval mode."""
    params = scored_parameters(model, layers)
    G = torch.cat([grads[name].reshape(grads[name].shape[0], -1) for name, _ in params], 1)
    b = feats.shape[0] // 2
    out = feats.new_zeros((b, G.shape[0]))
    for i in range(b):
        with torch.enable_grad():
            z = model.head(feats.detach())
            loss = nt_xent_sample_loss(z, i, temperature)
            g = torch.autograd.grad(loss, [p for _, p in params])
        g_flat = torch.cat([t.reshape(-1) for t in g]).to(G.dtype)
        norm = torch.linalg.vector_norm(g_flat)
        if norm > 0:
            out[i] = (G @ g_flat) / norm
    return out
