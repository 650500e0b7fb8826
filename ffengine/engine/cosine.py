"""The cosine gradient ``G_t = ∇_θ ℓ_cos(x_b, x_r; f_t)``, ``ℓ_cos = -cos(f(x_b), f(x_r))``,
taken on the projection-head output over the scored parameters (DESIGN.md §2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..models import SimCLRModel
from .head import scored_parameters


def embed(model: SimCLRModel, x: torch.Tensor) -> torch.Tensor:
    """Head output of [0, 1] images (N, 3, H, W), model in eval mode, no graph."""
    with torch.no_grad():
        return model(x)


def cosine_gradients(model: SimCLRModel, x_b: Sequence[torch.Tensor],
                     x_r: Sequence[torch.Tensor], layers: Sequence[str]
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Stacked cosine gradients of K backdoor instances.

    x_b, x_r: K images each, (3, H, W) float in [0, 1] (sizes may differ between instances).
    Returns ({parameter name: (K, *shape)}, cos (K,)). The backbone runs without a graph:
    θ is in the head.
    """
    if model.training:
        raise ValueError("cosine_gradients needs the model in eval mode.")
    params = scored_parameters(model, layers)
    per_k: list[tuple[torch.Tensor, ...]] = []
    cos_values = []
    for xb, xr in zip(x_b, x_r, strict=True):
        with torch.no_grad():
            hb = model.features(xb.unsqueeze(0))
            hr = model.features(xr.unsqueeze(0))
        with torch.enable_grad():
            cos = F.cosine_similarity(model.head(hb), model.head(hr), dim=1).squeeze(0)
            grads = torch.autograd.grad(-cos, [p for _, p in params], allow_unused=True)
        per_k.append(tuple(torch.zeros_like(p) if g is None else g
                           for g, (_, p) in zip(grads, params, strict=True)))
        cos_values.append(cos.detach())
    stacked = {name: torch.stack([g[j] for g in per_k]) for j, (name, _) in enumerate(params)}
    return stacked, torch.stack(cos_values)
