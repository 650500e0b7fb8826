"""The scorer against its slow reference, the score's sign, and the zero-gradient rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ffengine.engine.cosine import cosine_gradients
from ffengine.engine.head import (
    ghost_terms,
    head_signals,
    normalized_scores,
    scored_modules,
    scored_parameters,
)
from ffengine.errors import ConfigError
from ffengine.losses import nt_xent, nt_xent_per_sample_sum, nt_xent_sample_loss
from ffengine.models import ModelConfig, build_model
from ffengine.reference.scoring import score_batch_reference

from .conftest import TOLERANCES

LAYERS = ("head.fc1", "head.bn", "head.fc2")
CFG = ModelConfig(widths=(4, 8), blocks=(1, 1), head_hidden=13, out_dim=7)  # odd sizes


def random_model(dtype: torch.dtype, gen: torch.Generator):
    """A tiny model whose head has non-trivial BatchNorm statistics and affine parameters.
    The backbone's initialization is drawn from ``gen`` too, not from torch's global RNG,
    whose state depends on which tests ran before (once, in the whole suite, it gave
    test_score_sign_predicts... a sample whose tiny score the first-order check missed)."""
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        m = build_model(CFG).to(dtype)
    with torch.no_grad():
        for p in m.head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
        m.head.bn.running_mean.copy_(torch.randn(13, generator=gen, dtype=dtype))
        m.head.bn.running_var.copy_(torch.rand(13, generator=gen, dtype=dtype) + 0.5)
    return m.eval()


def instances(k: int, dtype: torch.dtype, gen: torch.Generator):
    xb = [torch.rand(3, 32, 32, generator=gen, dtype=dtype) for _ in range(k)]
    xr = [torch.rand(3, 32, 32, generator=gen, dtype=dtype) for _ in range(k)]
    return xb, xr


def fast_scores(model, feats, grads, temperature=0.5, backend="torch"):
    sig = head_signals(model.head, feats, scored_modules(model, LAYERS), temperature)
    dots, sq = ghost_terms(sig, grads, views=2, backend=backend)
    return normalized_scores(dots, sq)


def test_per_sample_surrogate_matches_the_per_sample_losses(rng):
    z = torch.randn(14, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    total = nt_xent_per_sample_sum(z, 0.5)
    # value: the sum of the per-sample losses, and B·(mean NT-Xent) as SimCLR defines it
    ref = sum(nt_xent_sample_loss(z, i, 0.5) for i in range(7))
    assert torch.allclose(total, ref, rtol=1e-12)
    assert torch.allclose(total, nt_xent(z, 0.5) * 7, rtol=1e-12)
    # gradient: on sample i's rows, exactly the gradient of ℓ_pre(x_i) alone
    (g,) = torch.autograd.grad(total, z)
    for i in range(7):
        (gi,) = torch.autograd.grad(nt_xent_sample_loss(z, i, 0.5), z)
        rows = [i, 7 + i]
        assert torch.allclose(g[rows], gi[rows], rtol=1e-10, atol=1e-14)
        others = [r for r in range(14) if r not in rows]
        assert gi[others].abs().max() == 0  # negatives are constants


@pytest.mark.parametrize("groups", [2, 3])
def test_per_sample_surrogate_over_groups_is_the_sum_of_each_groups(groups, rng):
    """Several scoring batches in one call (fused on a GPU): the value and every row's
    gradient are those of each batch on its own, its negatives its own."""
    b = 5
    per = [torch.randn(2 * b, 6, generator=rng, dtype=torch.float64) for _ in range(groups)]
    # the fused layout: view-major over all samples, batch j's samples j*b .. j*b+b-1
    z = torch.cat([p[:b] for p in per] + [p[b:] for p in per]).requires_grad_(True)
    total = nt_xent_per_sample_sum(z, 0.5, groups)
    (g,) = torch.autograd.grad(total, z)
    want = 0.0
    for j, p in enumerate(per):
        p = p.clone().requires_grad_(True)
        loss = nt_xent_per_sample_sum(p, 0.5)
        (gp,) = torch.autograd.grad(loss, p)
        want = want + loss
        rows = list(range(j * b, j * b + b)) + list(range(groups * b + j * b,
                                                          groups * b + j * b + b))
        torch.testing.assert_close(g[rows], gp, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(total, want, rtol=1e-12, atol=0)


def test_per_sample_surrogate_refuses_unequal_groups(rng):
    with pytest.raises(ValueError, match="equal batches"):
        nt_xent_per_sample_sum(torch.randn(14, 3, generator=rng), 0.5, groups=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("b", [2, 3, 9])  # b=1: zero gradient, tested below
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_fast_path_equals_autograd_reference(dtype, k, b, backend, rng):
    model = random_model(dtype, rng)
    grads, _ = cosine_gradients(model, *instances(k, dtype, rng), LAYERS)
    feats = torch.randn(2 * b, 8, generator=rng, dtype=dtype)
    ref = score_batch_reference(model, feats, grads, LAYERS, 0.5)
    got = fast_scores(model, feats, grads, backend=backend)
    assert got.shape == (b, k)
    scale = ref.abs().max()
    assert scale > 0
    assert ((got - ref).abs().max() / scale).item() <= TOLERANCES[dtype]


def test_cosine_gradient_matches_finite_differences(rng):
    model = random_model(torch.float64, rng)
    xb, xr = instances(1, torch.float64, rng)
    grads, cos = cosine_gradients(model, xb, xr, LAYERS)

    def neg_cos():
        with torch.no_grad():
            return -F.cosine_similarity(model(xb[0][None]), model(xr[0][None])).item()

    assert abs(-neg_cos() - cos[0].item()) < 1e-12
    w = model.head.fc2.weight
    eps = 1e-6
    for idx in [(0, 0), (3, 5), (6, 12)]:
        with torch.no_grad():
            w[idx] += eps
            up = neg_cos()
            w[idx] -= 2 * eps
            down = neg_cos()
            w[idx] += eps
        fd = (up - down) / (2 * eps)
        assert abs(fd - grads["head.fc2.weight"][0][idx].item()) < 1e-7


def test_score_sign_predicts_the_cosine_rise_of_a_descent_step(rng):
    """A small normalized descent step on one sample's loss raises cos(f(x_b), f(x_r)) by
    α·s_i to first order (DESIGN.md §2)."""
    model = random_model(torch.float64, rng)
    xb, xr = instances(1, torch.float64, rng)
    feats = torch.randn(10, 8, generator=rng, dtype=torch.float64)
    grads, cos0 = cosine_gradients(model, xb, xr, LAYERS)
    scores = fast_scores(model, feats, grads)[:, 0]
    params = [p for _, p in scored_parameters(model, LAYERS)]
    step = 1e-5
    for i in range(5):
        with torch.enable_grad():
            loss = nt_xent_sample_loss(model.head(feats), i, 0.5)
            g = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((t * t).sum() for t in g))
        with torch.no_grad():
            for p, t in zip(params, g, strict=True):
                p -= step * t / norm
            cos1 = F.cosine_similarity(model(xb[0][None]), model(xr[0][None])).item()
            for p, t in zip(params, g, strict=True):
                p += step * t / norm
        measured = cos1 - cos0.item()
        predicted = step * scores[i].item()
        assert np.sign(measured) == np.sign(predicted)
        assert abs(measured - predicted) <= 1e-3 * abs(predicted) + 1e-13


def test_zero_gradient_sample_scores_zero_not_nan(rng):
    """A batch of one sample: its only candidate is its own positive, so ℓ^a = ℓ^b = 0
    identically and its gradient vanishes."""
    model = random_model(torch.float64, rng)
    grads, _ = cosine_gradients(model, *instances(2, torch.float64, rng), LAYERS)
    feats = torch.randn(2, 8, generator=rng, dtype=torch.float64)
    got = fast_scores(model, feats, grads)
    assert torch.equal(got, torch.zeros(1, 2, dtype=torch.float64))
    ref = score_batch_reference(model, feats, grads, LAYERS, 0.5)
    assert torch.equal(ref, torch.zeros(1, 2, dtype=torch.float64))


def test_unknown_or_unsupported_layers_are_refused():
    model = build_model(CFG)
    with pytest.raises(ConfigError, match="not a module"):
        scored_modules(model, ["head.nope"])
    with pytest.raises(ConfigError, match="supports nn.Linear"):
        scored_modules(model, ["backbone.stem.0"])


def test_head_signals_need_eval_mode(rng):
    model = random_model(torch.float32, rng).train()
    with pytest.raises(ConfigError, match="eval mode"):
        head_signals(model.head, torch.randn(4, 8), scored_modules(model, LAYERS), 0.5)


def test_onehot_sample_loss_equals_indexed_and_vmaps(rng):
    """nt_xent_sample_loss_onehot == nt_xent_sample_loss (value and gradient), and vmap over
    one-hots gives every sample's gradient at once."""
    from torch.func import grad, vmap

    from ffengine.losses import nt_xent_sample_loss_onehot

    b, d = 5, 7
    z = torch.randn(2 * b, d, generator=rng, dtype=torch.float64)
    eye = torch.eye(b, dtype=torch.float64)
    per_sample = vmap(grad(nt_xent_sample_loss_onehot), in_dims=(None, 0, None))(z, eye, 0.5)
    for i in range(b):
        zi = z.clone().requires_grad_(True)
        ref = nt_xent_sample_loss(zi, i, 0.5)
        (g_ref,) = torch.autograd.grad(ref, zi)
        zj = z.clone().requires_grad_(True)
        val = nt_xent_sample_loss_onehot(zj, eye[i], 0.5)
        (g,) = torch.autograd.grad(val, zj)
        torch.testing.assert_close(val, ref.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(per_sample[i], g_ref, rtol=1e-10, atol=1e-12)


def test_default_workers_decode_in_process_on_cpu_and_in_workers_on_a_gpu(monkeypatch):
    from ffengine.engine import scoring

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert scoring.default_workers("cpu") == 0
    monkeypatch.setattr(scoring.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert scoring.default_workers("cuda") == scoring.GPU_DECODE_WORKERS == 12
    monkeypatch.setattr(scoring.os, "sched_getaffinity", lambda pid: set(range(6)))
    assert scoring.default_workers(torch.device("cuda", 0)) == 4  # two cores left
    monkeypatch.setattr(scoring.os, "sched_getaffinity", lambda pid: {0})
    assert scoring.default_workers("cuda") == 1
    monkeypatch.setattr(scoring.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 GPU processes share the 64 cores
    assert scoring.default_workers("cuda") == 6
