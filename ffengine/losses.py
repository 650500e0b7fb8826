"""Contrastive losses: the pre-training NT-Xent and the per-sample surrogate used in scoring.

Views are laid out (2B, d): rows ``i`` and ``B + i`` are the two views of sample ``i``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over a batch of 2B views, mean over the 2B anchors."""
    n = z.shape[0]
    if n % 2:
        raise ValueError(f"nt_xent needs an even number of views (2B), got {n}.")
    b = n // 2
    # reduced-precision embeddings (autocast) are normalized in float32
    u = F.normalize(z.float() if z.dtype in (torch.bfloat16, torch.float16) else z, dim=1)
    logits = u @ u.T / temperature
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    pos = torch.cat([torch.arange(b, n), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, pos)


def nt_xent_per_sample_sum(z: torch.Tensor, temperature: float, groups: int = 1) -> torch.Tensor:
    """``Σ_i ℓ_pre(x_i)`` with the other batch members detached for each sample's term.

    ``ℓ_pre(x_i) = (ℓ^a + ℓ^b) / 2`` (DESIGN.md §2); in sample ``i``'s term only its own two
    views ``a, b`` carry gradient. So one backward of this sum puts exactly
    ``∂ℓ_pre(x_i)/∂z_{i,v}`` on each view row: the per-sample backprop signal the ghost
    algebra needs.

    ``groups``: the 2N rows hold ``groups`` batches of B = N / groups consecutive samples,
    each batch its own negatives (view-major over all N: rows ``i`` and ``N + i`` are the
    views of sample ``i``, which belongs to batch ``i // B``): the sum over every batch, as
    one batched computation (one launch per operation, however many batches).
    """
    n = z.shape[0]
    if n % 2:
        raise ValueError(f"the per-sample loss needs an even number of views (2B), got {n}.")
    if groups < 1 or (n // 2) % groups:
        raise ValueError(f"{n // 2} samples do not split into {groups} equal batches.")
    if groups > 1:  # (2N, d) -> (groups, 2B, d), each group view-major in itself
        z = z.reshape(2, groups, n // 2 // groups, -1).transpose(0, 1).reshape(
            groups, n // groups, -1)
        n = z.shape[1]
    b = n // 2
    u = F.normalize(z, dim=-1)
    partner = torch.cat([u[..., b:, :], u[..., :b, :]], dim=-2)
    pos = (u * partner).sum(-1) / temperature  # both views live
    sims = u @ u.detach().mT / temperature  # anchor live, every other view detached
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    pos_mask = torch.zeros_like(eye)
    idx = torch.arange(n, device=z.device)
    pos_mask[idx, torch.cat([idx[b:], idx[:b]])] = True
    # the partner column carries the fully live positive similarity
    sims = torch.where(pos_mask, pos.unsqueeze(-1).expand(*pos.shape, n), sims)
    sims = sims.masked_fill(eye, float("-inf"))
    per_view = torch.logsumexp(sims, dim=-1) - pos
    return per_view.sum() / 2


def nt_xent_sample_loss(z: torch.Tensor, i: int, temperature: float) -> torch.Tensor:
    """``ℓ_pre(x_i)`` alone, the other views detached: the slow reference's loss."""
    n = z.shape[0]
    b = n // 2
    live = torch.zeros(n, dtype=torch.bool, device=z.device)
    live[[i, b + i]] = True
    zz = torch.where(live.unsqueeze(1), z, z.detach())
    u = F.normalize(zz, dim=1)
    total = z.new_zeros(())
    for a, p in ((i, b + i), (b + i, i)):
        logits = (u[a] @ u.T) / temperature
        logits = torch.cat([logits[:a], logits[a + 1:]])
        total = total + torch.logsumexp(logits, 0) - (u[a] @ u[p]) / temperature
    return total / 2


def nt_xent_sample_loss_onehot(z: torch.Tensor, onehot: torch.Tensor,
                               temperature: float) -> torch.Tensor:
    """:func:`nt_xent_sample_loss` with the sample picked by a (B,) one-hot instead of an
    index, so ``torch.func.vmap`` can batch it over samples (benchmarks and the peer check
    materialize per-sample gradients with it)."""
    m = torch.cat([onehot, onehot]).unsqueeze(1)
    u = F.normalize(m * z + (1 - m) * z.detach(), dim=1)
    zero = torch.zeros_like(onehot)
    total = z.new_zeros(())
    for sel_a, sel_p in ((torch.cat([onehot, zero]), torch.cat([zero, onehot])),
                         (torch.cat([zero, onehot]), torch.cat([onehot, zero]))):
        ua, up = sel_a @ u, sel_p @ u
        logits = (u @ ua) / temperature
        logits = torch.where(sel_a.bool(), torch.full_like(logits, -torch.inf), logits)
        total = total + torch.logsumexp(logits, 0) - (ua @ up) / temperature
    return total / 2


# --------------------------------------------------------------------------- CLIP
# Image and text embeddings are laid out (B, d), row i of each belonging to pair i; ``scale``
# is the checkpoint's exp(logit_scale) (clamped at 100), a constant here.


def clip_infonce(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor | float
                 ) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: ½[CE(images → texts) + CE(texts → images)], batch mean."""
    u, t = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    logits = scale * u @ t.T
    labels = torch.arange(len(u), device=u.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_per_sample_sum(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor | float
                        ) -> torch.Tensor:
    """``Σ_i ℓ_pre(x_i)``, ``ℓ_pre(x_i) = ½[CE(image_i → texts) + CE(text_i → images)]``,
    with the gradient reaching the image side only through ``e_i`` in sample i's term
    (DESIGN.md §2): texts are constants, and in ``CE(text_i → images)`` every image but
    ``i`` is detached. One backward of this sum puts exactly ``∂ℓ_pre(x_i)/∂e_i`` on row i.
    """
    u = F.normalize(img, dim=1)
    t = F.normalize(txt, dim=1).detach()
    pos = scale * (u * t).sum(1)  # (B,) s·u_i·t_i, live in u_i
    # image_i -> texts: row i depends on u_i only (the texts are constants)
    i2t = torch.logsumexp(scale * u @ t.T, dim=1) - pos
    # text_i -> images: image j ≠ i detached, the diagonal (j = i) live
    sims = scale * t @ u.detach().T
    eye = torch.eye(len(u), dtype=torch.bool, device=u.device)
    sims = torch.where(eye, pos.unsqueeze(1).expand_as(sims), sims)
    t2i = torch.logsumexp(sims, dim=1) - pos
    return (i2t + t2i).sum() / 2


def clip_sample_loss(img: torch.Tensor, txt: torch.Tensor, i: int,
                     scale: torch.Tensor | float) -> torch.Tensor:
    """``ℓ_pre(x_i)`` alone, every image but ``i`` and every text detached: the slow
    reference's loss, written from the definition."""
    live = torch.zeros(len(img), dtype=torch.bool, device=img.device)
    live[i] = True
    u = F.normalize(torch.where(live.unsqueeze(1), img, img.detach()), dim=1)
    t = F.normalize(txt.detach(), dim=1)
    target = torch.tensor(i, device=img.device)
    ce_i2t = F.cross_entropy((scale * u[i] @ t.T).unsqueeze(0), target.unsqueeze(0))
    ce_t2i = F.cross_entropy((scale * t[i] @ u.T).unsqueeze(0), target.unsqueeze(0))
    return (ce_i2t + ce_t2i) / 2
