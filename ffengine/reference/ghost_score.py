"""Reference ghost score: materializes every per-sample gradient (DESIGN.md §2).

Slow and memory-hungry on purpose; it is the ground truth that the fast backends
(``ffengine.ops.ghost_score``) are tested against.
"""

from __future__ import annotations

import torch


def ghost_score_reference(
    h: torch.Tensor,
    delta: torch.Tensor,
    G_w: torch.Tensor,
    G_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dots with K stacked gradients and squared norms of per-sample Linear-layer gradients.

    For a Linear layer ``y = W h + b``, sample ``i`` with views ``v``:
    ``g_i(W) = Σ_v δ_{i,v} h_{i,v}ᵀ`` and ``g_i(b) = Σ_v δ_{i,v}``, flattened into ``g_i``.

    Args:
        h: (B, V, d_in) layer inputs.
        delta: (B, V, d_out) backprop signals ``∂ℓ/∂y``.
        G_w: (K, d_out, d_in) stacked weight gradients.
        G_b: (K, d_out) stacked bias gradients, or None for a layer without bias
            (then ``g_i`` has no bias part).

    Returns:
        ``(dots, sqnorm)``: dots (B, K) with ``dots[i, k] = ⟨G_k, g_i⟩`` and sqnorm (B,) with
        ``sqnorm[i] = ‖g_i‖²``, in the dtype of the inputs.
    """
    B = h.shape[0]
    K = G_w.shape[0]
    G_parts = [G_w.flatten(1)]  # flatten, not reshape(K, -1): K may be 0
    if G_b is not None:
        G_parts.append(G_b)
    G_flat = torch.cat(G_parts, dim=1)  # (K, d_out*d_in [+ d_out])

    dots = torch.empty(B, K, dtype=h.dtype, device=h.device)
    sqnorm = torch.empty(B, dtype=h.dtype, device=h.device)
    for i in range(B):
        g_w = torch.einsum("vo,vi->oi", delta[i], h[i])  # Σ_v δ_{i,v} h_{i,v}ᵀ, (d_out, d_in)
        g_parts = [g_w.reshape(-1)]
        if G_b is not None:
            g_parts.append(delta[i].sum(dim=0))  # Σ_v δ_{i,v}, (d_out,)
        g = torch.cat(g_parts)
        dots[i] = G_flat @ g
        sqnorm[i] = g @ g
    return dots, sqnorm
