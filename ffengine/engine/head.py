"""Per-sample projection-head signals and their ghost scores (DESIGN.md §2, fast path).

One forward of the head on a batch of 2B view features and one backward of
``Σ_i ℓ_pre(x_i)`` (other batch members detached per term) give, at every scored layer,
each view's input row ``h`` and backprop signal ``δ``. Dot products with the cosine
gradient ``G`` and the squared norm of each sample's gradient follow from those rows
alone; no per-sample gradient is formed.

Scored layers are ``nn.Linear`` (weight, bias if any) and ``nn.BatchNorm1d`` in eval mode
(affine weight ``γ`` and bias ``β``: ``y = γ ⊙ x̂ + β``, so ``g_γ = Σ_v δ_v ⊙ x̂_v``,
``g_β = Σ_v δ_v``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..losses import nt_xent_per_sample_sum
from ..ops.ghost_score import ghost_score


@dataclass
class LayerSignal:
    """Rows of one scored layer for a batch: ``inp`` (2B, d_in) is the Linear input or the
    BatchNorm's normalized ``x̂``; ``delta`` (2B, d_out) the backprop signal at its output."""

    name: str
    module: nn.Module
    inp: torch.Tensor
    delta: torch.Tensor


def scored_modules(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    mods = dict(model.named_modules())
    out = []
    for name in names:
        if name not in mods:
            layers = [n for n, m in mods.items() if isinstance(m, nn.Linear | nn.BatchNorm1d)]
            raise ConfigError(f"scored layer {name!r} is not a module of the model; "
                              f"scorable layers: {layers}.")
        m = mods[name]
        if not isinstance(m, nn.Linear | nn.BatchNorm1d):
            raise ConfigError(f"scored layer {name!r} is a {type(m).__name__}; the scorer "
                              "supports nn.Linear and nn.BatchNorm1d (affine).")
        if isinstance(m, nn.BatchNorm1d) and not m.affine:
            raise ConfigError(f"BatchNorm layer {name!r} has no affine parameters to score.")
        out.append((name, m))
    return out


def scored_parameters(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    """The parameters θ of DESIGN.md §2, in a fixed order: each layer's weight then bias."""
    params = []
    for name, m in scored_modules(model, names):
        params.append((f"{name}.weight", m.weight))
        if m.bias is not None:
            params.append((f"{name}.bias", m.bias))
    return params


def _bn_normalized(m: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    return (x - m.running_mean) / torch.sqrt(m.running_var + m.eps)


def head_signals(head: nn.Module, feats: torch.Tensor, layers: Sequence[tuple[str, nn.Module]],
                 temperature: float, groups: int = 1) -> list[LayerSignal]:
    """Forward ``head`` on (2B, d) view features and backprop the per-sample loss sum.

    ``layers`` are (name, module) pairs of modules inside ``head`` (names as in the whole
    model, from :func:`scored_modules`). The head must be in eval mode
    (BatchNorm uses its running statistics, so every view row is independent).
    ``groups``: the rows hold that many scoring batches (see
    :func:`~ffengine.losses.nt_xent_per_sample_sum`), each its own negatives.
    """
    if head.training:
        raise ConfigError("the head must be in eval mode for per-sample scoring.")
    captured: dict[nn.Module, dict] = {m: {} for _, m in layers}
    handles = []

    def fwd_hook(m, args, out):
        x = args[0]
        captured[m]["inp"] = (_bn_normalized(m, x) if isinstance(m, nn.BatchNorm1d) else x
                              ).detach()
        captured[m]["out"] = out

    for _, m in layers:
        handles.append(m.register_forward_hook(fwd_hook))
    try:
        with torch.enable_grad():
            x = feats.detach().requires_grad_(True)  # gives the graph a leaf to start from
            z = head(x)
            loss = nt_xent_per_sample_sum(z, temperature, groups)
            outs = [captured[m]["out"] for _, m in layers]
            deltas = torch.autograd.grad(loss, outs)
    finally:
        for h in handles:
            h.remove()
    return [LayerSignal(name, m, captured[m]["inp"], d.detach())
            for (name, m), d in zip(layers, deltas, strict=True)]


def _per_sample(t: torch.Tensor, views: int) -> torch.Tensor:
    """(V·B, d) rows laid out view-major -> (B, V, d)."""
    return t.reshape(views, -1, t.shape[-1]).transpose(0, 1).contiguous()


def ghost_terms(signals: Sequence[LayerSignal], grads: dict[str, torch.Tensor],
                views: int = 2, backend: str | None = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed over scored layers: dots (B, K) with the K stacked cosine gradients and the
    squared norm (B,) of each sample's gradient.

    ``grads`` maps parameter name (``head.fc1.weight``...) to its stacked cosine gradient of
    shape (K, *param.shape).
    """
    dots, sq = None, None
    for s in signals:
        h = _per_sample(s.inp, views)
        d = _per_sample(s.delta, views)
        G_w = grads[f"{s.name}.weight"].to(h.dtype)
        G_b = grads.get(f"{s.name}.bias")
        G_b = G_b.to(h.dtype) if G_b is not None else None
        if isinstance(s.module, nn.Linear):
            dd, ss = ghost_score(h, d, G_w, G_b, backend=backend)
        else:  # BatchNorm affine: the per-sample gradient is only d-dimensional
            g_gamma = (d * h).sum(1)  # (B, d)
            dd = g_gamma @ G_w.T
            ss = (g_gamma * g_gamma).sum(1)
            if G_b is not None:
                g_beta = d.sum(1)
                dd = dd + g_beta @ G_b.T
                ss = ss + (g_beta * g_beta).sum(1)
        dots = dd if dots is None else dots + dd
        sq = ss if sq is None else sq + ss
    return dots, sq


def normalized_scores(dots: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """``⟨G, g⟩ / ‖g‖`` per sample and instance; a zero gradient scores 0, never NaN."""
    norm = torch.sqrt(sqnorm).unsqueeze(1)
    return torch.where(norm > 0, dots / torch.where(norm > 0, norm, torch.ones_like(norm)),
                       torch.zeros_like(dots))
