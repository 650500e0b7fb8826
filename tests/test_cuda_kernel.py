"""The CUDA ghost-score kernels (``csrc/ghost_score_cuda.cu``, backend "cuda") against the
materializing reference evaluated in float64.

Every test here needs a CUDA GPU and nvcc (the kernels compile at first use, about a minute);
all are marked ``gpu`` and skipped elsewhere. ``bench/gpu_session.sh`` runs them on a lent GPU
machine. What CPU-only machines can check (the refusal and the reason when the kernels cannot
be built) is in tests/test_ghost_score.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from ffengine.errors import BackendUnavailableError
from ffengine.ops import ghost_score, ghost_score_torch, resolve_backend

from .conftest import TOLERANCES
from .kernel_checks import REDUCED_PRECISION_RATIO, reference_f64, scaled_error

pytestmark = pytest.mark.gpu

gs_module = importlib.import_module("ffengine.ops.ghost_score")


@pytest.fixture(scope="module")
def cuda():
    """The built extension module (skips, with the reason, where it cannot be built)."""
    from ffengine.ops import cuda_ext

    if cuda_ext.load() is None:
        pytest.skip(f"the CUDA kernels cannot run: {cuda_ext.unavailable_reason()}")
    return cuda_ext


def make_inputs(gen, B, V, K, d_in, d_out, bias, dtype=torch.float32):
    """Fresh float64 normals rounded to ``dtype``, on the GPU."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to("cuda", dtype)

    return (randn(B, V, d_in), randn(B, V, d_out), randn(K, d_out, d_in),
            randn(K, d_out) if bias else None)


def assert_matches(got, want, dtype=torch.float32):
    for name, g, w in zip(("dots", "sqnorm"), got, want, strict=True):
        assert g.dtype == dtype, name
        err = scaled_error(g, w)
        assert err <= TOLERANCES[dtype], f"{name}: scaled error {err:.3g} > {TOLERANCES[dtype]:g}"


@pytest.mark.parametrize("B", [1, 3, 17, 100])
@pytest.mark.parametrize("V", [1, 2, 3])
@pytest.mark.parametrize("K", [1, 2, 8])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(cuda, B, V, K, bias, rng):
    inputs = make_inputs(rng, B, V, K, 37, 19, bias)
    assert_matches(cuda.ghost_score_cuda(*inputs), reference_f64(*inputs))


@pytest.mark.parametrize(
    "d_in, d_out",
    [(1, 1), (15, 17), (16, 64), (63, 65), (64, 63), (130, 200), (512, 128), (512, 512)],
)
def test_matches_reference_at_tile_remainders(cuda, d_in, d_out, rng):
    """Dimensions below, at and across the 16-input slab and the 64-wide output tile."""
    inputs = make_inputs(rng, 70, 2, 3, d_in, d_out, True)
    assert_matches(cuda.ghost_score_cuda(*inputs), reference_f64(*inputs))


def test_float64_matches_reference_to_float64_rounding(cuda, rng):
    inputs = make_inputs(rng, 33, 2, 4, 130, 67, True, dtype=torch.float64)
    assert_matches(cuda.ghost_score_cuda(*inputs), reference_f64(*inputs), torch.float64)


def test_strided_and_expanded_inputs(cuda, rng):
    """Any strides: transposed storage, a sliced batch, an expanded (stride 0) gradient."""
    h, delta, G_w, G_b = make_inputs(rng, 24, 2, 3, 37, 19, True)
    h_t = h.transpose(0, 1).contiguous().transpose(0, 1)
    delta_s = torch.stack([delta, delta], dim=1)[:, 0]  # a sample stride of 2·2·19
    G_w_e = G_w[:1].expand(3, -1, -1)
    G_b_t = G_b.t().contiguous().t()
    got = cuda.ghost_score_cuda(h_t, delta_s, G_w_e, G_b_t)
    assert_matches(got, reference_f64(h, delta, G_w_e, G_b))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_zero_delta_sample_scores_exactly_zero(cuda, bias, rng):
    h, delta, G_w, G_b = make_inputs(rng, 5, 2, 3, 37, 19, bias)
    delta[2] = 0
    dots, sqnorm = cuda.ghost_score_cuda(h, delta, G_w, G_b)
    assert torch.all(dots[2] == 0) and sqnorm[2] == 0


@pytest.mark.parametrize("B, K", [(0, 3), (4, 0)])
def test_empty_batch_or_no_instances(cuda, B, K, rng):
    inputs = make_inputs(rng, B, 2, K, 37, 19, True)
    dots, sqnorm = cuda.ghost_score_cuda(*inputs)
    assert dots.shape == (B, K) and sqnorm.shape == (B,)
    assert_matches((dots, sqnorm), reference_f64(*inputs))


def test_results_do_not_depend_on_the_run(cuda, rng):
    """No atomics: every sum has a fixed order, so two calls agree bit for bit."""
    inputs = make_inputs(rng, 300, 2, 8, 512, 128, True)
    first = cuda.ghost_score_cuda(*inputs)
    second = cuda.ghost_score_cuda(*inputs)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("V", [1, 2])
def test_reduced_precision_within_twice_plain_torch(cuda, dtype, V, rng):
    """float32 accumulation of exact half-precision products: at most 2x the error of
    ghost_score_torch on the same rounded inputs, and within the float32 tolerance."""
    inputs = make_inputs(rng, 17, V, 3, 130, 37, True, dtype=dtype)
    want = reference_f64(*inputs)
    got = cuda.ghost_score_cuda(*inputs)
    plain = ghost_score_torch(*inputs)
    for name, g, p, w in zip(("dots", "sqnorm"), got, plain, want, strict=True):
        assert g.dtype == torch.float32
        kernel_err, torch_err = scaled_error(g, w), scaled_error(p, w)
        assert kernel_err <= REDUCED_PRECISION_RATIO * torch_err, (name, kernel_err, torch_err)
        assert kernel_err <= TOLERANCES[torch.float32], (name, kernel_err)


def test_public_op_runs_cuda_by_name_and_casts_to_the_input_dtype(cuda, rng, monkeypatch):
    monkeypatch.delenv(gs_module.ENV_VAR, raising=False)
    gs_module._reset_backend_cache()
    assert resolve_backend("cuda", device="cuda") == "cuda"
    inputs = make_inputs(rng, 6, 2, 3, 37, 19, True)
    assert_matches(ghost_score(*inputs, backend="cuda"), reference_f64(*inputs))
    half = make_inputs(rng, 6, 2, 3, 37, 19, True, dtype=torch.bfloat16)
    dots, sqnorm = ghost_score(*half, backend="cuda")
    assert dots.dtype == sqnorm.dtype == torch.bfloat16


def test_named_cuda_refuses_inputs_that_need_autograd(cuda, rng):
    h, delta, G_w, G_b = make_inputs(rng, 3, 2, 2, 37, 19, True)
    h.requires_grad_(True)
    with pytest.raises(BackendUnavailableError, match="not differentiable"):
        ghost_score(h, delta, G_w, G_b, backend="cuda")


def test_agrees_with_the_triton_kernels(cuda, rng):
    """Two independent fused implementations of the same algebra, at the engine's shapes."""
    kernels = pytest.importorskip("ffengine.kernels.ghost_score")
    if kernels.interpreted():
        pytest.skip("Triton runs in its interpreter in this process")
    inputs = make_inputs(rng, 512, 2, 8, 512, 128, True)
    got = cuda.ghost_score_cuda(*inputs)
    other = kernels.ghost_score_triton(*inputs)
    for g, o in zip(got, other, strict=True):
        assert scaled_error(g, o.cpu().double()) <= TOLERANCES[torch.float32]
