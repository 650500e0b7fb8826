"""ghost_score: every backend against the reference, edge cases, input checks, backend choice."""

from __future__ import annotations

import importlib
import logging
import re
import sys

import pytest
import torch

from ffengine import _ext
from ffengine.errors import BackendUnavailableError
from ffengine.ops import ghost_score, ghost_score_torch, resolve_backend
from ffengine.reference import ghost_score_reference

from .conftest import TOLERANCES

gs_module = importlib.import_module("ffengine.ops.ghost_score")

# Odd sizes on purpose: not multiples of any block or vector width.
D_IN, D_OUT = 37, 19


def make_inputs(
    gen: torch.Generator,
    B: int,
    V: int,
    K: int,
    bias: bool,
    dtype: torch.dtype = torch.float64,
    d_in: int = D_IN,
    d_out: int = D_OUT,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return (
        randn(B, V, d_in),
        randn(B, V, d_out),
        randn(K, d_out, d_in),
        (randn(K, d_out) if bias else None),
    )


def reference_f64(h, delta, G_w, G_b):
    """The reference evaluated in float64 on the same (possibly rounded) inputs."""
    up = [None if t is None else t.double() for t in (h, delta, G_w, G_b)]
    return ghost_score_reference(*up)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype):
    """|actual - expected| <= rtol(dtype) * max|expected| elementwise."""
    assert actual.shape == expected.shape
    assert actual.dtype == dtype
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    err = float((actual.double() - expected).abs().max()) if expected.numel() else 0.0
    assert err <= TOLERANCES[dtype] * scale, f"max error {err:.3g} vs scale {scale:.3g}"


@pytest.fixture
def fresh_backend_state():
    """Forget cached extension/self-check/auto results before and after the test."""
    _ext._reset_for_tests()
    gs_module._reset_backend_cache()
    yield
    _ext._reset_for_tests()
    gs_module._reset_backend_cache()


@pytest.fixture
def no_extension(monkeypatch, fresh_backend_state):
    """Simulate a machine where ffengine._C cannot be imported."""
    monkeypatch.setitem(sys.modules, "ffengine._C", None)
    monkeypatch.delenv(gs_module.ENV_VAR, raising=False)
    with pytest.warns(RuntimeWarning, match=_ext.WARNING_PREFIX):
        assert _ext.load_extension() is None


@pytest.fixture(params=["torch", "cpu"])
def backend(request) -> str:
    if request.param == "cpu":
        request.getfixturevalue("ext")
    return request.param


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B", [1, 5, 64])
@pytest.mark.parametrize("V", [1, 2, 3])
@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(backend, dtype, B, V, K, bias, rng):
    h, delta, G_w, G_b = make_inputs(rng, B, V, K, bias, dtype)
    dots, sqnorm = ghost_score(h, delta, G_w, G_b, backend=backend)
    ref_dots, ref_sqnorm = reference_f64(h, delta, G_w, G_b)
    assert_close_scaled(dots, ref_dots, dtype)
    assert_close_scaled(sqnorm, ref_sqnorm, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_reference_at_wider_layers(backend, dtype, rng):
    """Long inner loops (float32 accumulation error) and every tile remainder at once."""
    h, delta, G_w, G_b = make_inputs(rng, 37, 2, 3, True, dtype, d_in=515, d_out=129)
    dots, sqnorm = ghost_score(h, delta, G_w, G_b, backend=backend)
    ref_dots, ref_sqnorm = reference_f64(h, delta, G_w, G_b)
    assert_close_scaled(dots, ref_dots, dtype)
    assert_close_scaled(sqnorm, ref_sqnorm, dtype)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_reference_matches_autograd(bias, rng):
    """The reference equals per-sample gradients of a real Linear layer taken by autograd."""
    B, V, K = 4, 3, 2
    h, delta, G_w, G_b = make_inputs(rng, B, V, K, bias)
    layer = torch.nn.Linear(D_IN, D_OUT, bias=bias, dtype=torch.float64)
    ref_dots, ref_sqnorm = ghost_score_reference(h, delta, G_w, G_b)
    G_flat = torch.cat([G_w.reshape(K, -1)] + ([G_b] if bias else []), dim=1)
    for i in range(B):
        # ℓ_i = Σ_v δ_{i,v} · y_{i,v} has ∂ℓ_i/∂y_{i,v} = δ_{i,v}.
        loss = (layer(h[i]) * delta[i]).sum()
        grads = torch.autograd.grad(loss, list(layer.parameters()))
        g = torch.cat([t.reshape(-1) for t in grads])
        torch.testing.assert_close(ref_dots[i], G_flat @ g, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ref_sqnorm[i], g @ g, rtol=1e-12, atol=1e-12)


def test_reference_keeps_dtype(rng):
    h, delta, G_w, G_b = make_inputs(rng, 3, 2, 2, True, torch.float32)
    dots, sqnorm = ghost_score_reference(h, delta, G_w, G_b)
    assert dots.dtype == sqnorm.dtype == torch.float32
    assert dots.shape == (3, 2) and sqnorm.shape == (3,)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_zero_delta_sample_scores_zero(backend, bias, rng):
    h, delta, G_w, G_b = make_inputs(rng, 5, 2, 3, bias)
    delta[2] = 0
    dots, sqnorm = ghost_score(h, delta, G_w, G_b, backend=backend)
    assert torch.all(dots[2] == 0)
    assert sqnorm[2] == 0
    assert torch.all(sqnorm[[0, 1, 3, 4]] > 0)


def test_empty_batch(backend, rng):
    h, delta, G_w, G_b = make_inputs(rng, 0, 2, 3, True)
    dots, sqnorm = ghost_score(h, delta, G_w, G_b, backend=backend)
    assert dots.shape == (0, 3) and sqnorm.shape == (0,)


def test_torch_backend_is_differentiable(rng):
    h, delta, G_w, G_b = make_inputs(rng, 3, 2, 2, True)
    h.requires_grad_(True)
    dots, sqnorm = ghost_score_torch(h, delta, G_w, G_b)
    ref_dots, ref_sqnorm = ghost_score_reference(h, delta, G_w, G_b)
    (got,) = torch.autograd.grad((dots.sum() + sqnorm.sum()), h)
    (want,) = torch.autograd.grad((ref_dots.sum() + ref_sqnorm.sum()), h)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- input checks


def _bad_case(name: str, rng: torch.Generator):
    h, delta, G_w, G_b = make_inputs(rng, 5, 2, 3, True)
    cases = {
        "h_ndim": ((h[0], delta, G_w, G_b), "'h' must have 3 dimensions"),
        "delta_batch": ((h, delta[:4], G_w, G_b), "'delta' must have shape (B, V, d_out)"),
        "delta_views": ((h, delta[:, :1], G_w, G_b), "received (5, 1, 19)"),
        "G_w_d_in": ((h, delta, G_w[:, :, :-1], G_b), "'G_w' must have shape (K, d_out, d_in)"),
        "G_w_d_out": ((h, delta, G_w[:, :-1], G_b), "(d_out, d_in) = (19, 37)"),
        "G_b_K": ((h, delta, G_w, G_b[:2]), "'G_b' must have shape (K, d_out) = (3, 19)"),
        "G_b_ndim": ((h, delta, G_w, G_b[0]), "'G_b' must have 2 dimensions"),
        "int_dtype": ((h.long(), delta, G_w, G_b), "floating-point dtype; received torch.int64"),
        "mixed_dtype": ((h, delta.float(), G_w, G_b), "'delta' must have dtype torch.float64"),
    }
    return cases[name]


@pytest.mark.parametrize(
    "case",
    [
        "h_ndim",
        "delta_batch",
        "delta_views",
        "G_w_d_in",
        "G_w_d_out",
        "G_b_K",
        "G_b_ndim",
        "int_dtype",
        "mixed_dtype",
    ],
)
def test_bad_inputs_raise_clear_error(backend, case, rng):
    args, message = _bad_case(case, rng)
    with pytest.raises(ValueError, match=re.escape(message)):
        ghost_score(*args, backend=backend)


def test_non_tensor_input_raises_type_error(rng):
    h, delta, G_w, G_b = make_inputs(rng, 2, 1, 1, True)
    with pytest.raises(TypeError, match="'h' must be a torch.Tensor; received ndarray"):
        ghost_score(h.numpy(), delta, G_w, G_b, backend="torch")


def test_cpu_backend_rejects_half_precision(ext, rng):
    h, delta, G_w, G_b = make_inputs(rng, 2, 2, 1, True, torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="supports float32 and float64"):
        ghost_score(h, delta, G_w, G_b, backend="cpu")


def test_auto_uses_torch_for_inputs_the_cpu_backend_cannot_take(
    ext, rng, monkeypatch, fresh_backend_state
):
    # Make auto prefer the compiled op on CPU, as it would on a machine where it is faster.
    monkeypatch.setitem(gs_module._AUTO_PREFERENCE, "cpu", ("cpu", "torch"))
    monkeypatch.delenv(gs_module.ENV_VAR, raising=False)
    assert resolve_backend(None) == "cpu"
    h, delta, G_w, G_b = make_inputs(rng, 3, 2, 2, True)
    h.requires_grad_(True)
    dots, _ = ghost_score(h, delta, G_w, G_b)
    assert dots.requires_grad  # went through the differentiable torch backend


def test_non_contiguous_inputs_are_accepted(backend, rng):
    h, delta, G_w, G_b = make_inputs(rng, 4, 2, 3, True, d_in=2 * D_IN)
    h = h[:, :, ::2]  # (4, 2, 37), non-contiguous
    assert not h.is_contiguous()
    dots, sqnorm = ghost_score(h, delta, G_w[:, :, :D_IN], G_b, backend=backend)
    ref_dots, ref_sqnorm = ghost_score_reference(h, delta, G_w[:, :, :D_IN], G_b)
    assert_close_scaled(dots, ref_dots, torch.float64)
    assert_close_scaled(sqnorm, ref_sqnorm, torch.float64)


# --------------------------------------------------------------------------- backend choice


def test_explicit_backend_beats_env_var(monkeypatch):
    monkeypatch.setenv(gs_module.ENV_VAR, "no-such-backend")
    assert resolve_backend("torch") == "torch"


def test_explicit_cpu_beats_env_var(ext, monkeypatch):
    monkeypatch.setenv(gs_module.ENV_VAR, "torch")
    assert resolve_backend("cpu") == "cpu"


@pytest.mark.parametrize("name", [None, "auto", "AUTO "])
def test_env_var_beats_auto(name, monkeypatch):
    monkeypatch.setenv(gs_module.ENV_VAR, "torch")
    assert resolve_backend(name) == "torch"


def test_bad_env_var_raises_and_names_it(monkeypatch):
    monkeypatch.setenv(gs_module.ENV_VAR, "gpu-please")
    with pytest.raises(BackendUnavailableError, match="'gpu-please' .*FFENGINE_BACKEND"):
        resolve_backend(None)


@pytest.mark.parametrize("name", ["nope", "", 3])
def test_unknown_backend_raises(name):
    with pytest.raises(BackendUnavailableError, match="unknown ghost_score backend"):
        resolve_backend(name)


def test_named_cuda_backend_on_cpu_tensors_raises_with_reason(
    rng, monkeypatch, fresh_backend_state
):
    """The CUDA kernels take CUDA tensors: named for CPU inputs they refuse, saying why,
    without trying to compile anything."""
    from ffengine.ops import cuda_ext

    def build():
        raise AssertionError("tried to build the CUDA kernels for CPU inputs")

    monkeypatch.setattr(cuda_ext, "_build", build)
    cuda_ext._reset_for_tests()
    try:
        with pytest.raises(BackendUnavailableError,
                           match="'cuda' .*cannot run on cpu: .*CUDA tensors"):
            resolve_backend("cuda")
        with pytest.raises(BackendUnavailableError, match="'cuda' .*cannot run on cpu"):
            ghost_score(*make_inputs(rng, 2, 1, 1, False), backend="cuda")
    finally:
        cuda_ext._reset_for_tests()


def test_cuda_backend_says_why_it_cannot_be_built_here(monkeypatch, fresh_backend_state):
    """Where there is no CUDA device (or no nvcc) the reason names it and nothing is built."""
    from ffengine.ops import cuda_ext

    monkeypatch.setattr(cuda_ext.torch.cuda, "is_available", lambda: False)
    cuda_ext._reset_for_tests()
    try:
        assert cuda_ext.load() is None
        assert cuda_ext.unavailable_reason() == "no CUDA device is available"
        with pytest.raises(BackendUnavailableError, match="no CUDA device is available"):
            cuda_ext.ghost_score_cuda(*make_inputs(torch.Generator().manual_seed(0), 2, 1, 1,
                                                   False))
    finally:
        cuda_ext._reset_for_tests()


def test_named_triton_on_cpu_without_interpreter_raises_with_reason(
    rng, monkeypatch, fresh_backend_state
):
    kernels = sys.modules.get("ffengine.kernels.ghost_score")
    if kernels is not None and kernels.interpreted():
        pytest.skip("the Triton kernels were imported under TRITON_INTERPRET=1 in this process")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="'triton' .*cannot run on cpu: .*CUDA"):
        resolve_backend("triton")
    with pytest.raises(BackendUnavailableError, match="'triton' .*cannot run on cpu"):
        ghost_score(*make_inputs(rng, 2, 1, 1, False, torch.float32), backend="triton")


def test_auto_on_cpu_takes_the_compiled_op_and_never_triton(
    ext, monkeypatch, fresh_backend_state, caplog
):
    """The measured preference (bench/README.md): the compiled op is at least level with the
    torch composite on CPU, so auto takes it where it is built and passes its self-check;
    Triton's CPU interpreter (a test mode) is never auto's choice."""
    monkeypatch.delenv(gs_module.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    caplog.set_level(logging.WARNING, logger=gs_module.__name__)
    assert resolve_backend(None) == "cpu"
    assert resolve_backend("auto", device="cpu") == "cpu"
    assert "triton" not in gs_module._AUTO_PREFERENCE["cpu"]
    assert not caplog.records
    assert gs_module._check_failures == {("cpu", "cpu"): None}  # self-checked, passed


def test_auto_without_extension_takes_torch_and_says_why_once(no_extension, caplog, rng):
    caplog.set_level(logging.WARNING, logger=gs_module.__name__)
    assert resolve_backend(None) == "torch"
    assert resolve_backend(None) == "torch"
    dots, _ = ghost_score(*make_inputs(rng, 2, 1, 1, True))
    assert dots.shape == (2, 1)
    assert len(caplog.records) == 1
    assert "cannot import ffengine._C" in caplog.records[0].getMessage()


def test_auto_on_cuda_falls_back_to_torch_with_one_warning(
    monkeypatch, fresh_backend_state, caplog
):
    """Neither GPU kernel can run (simulated, so that this holds on a GPU machine where both
    would): auto takes torch and says once why it passed over each."""
    from ffengine.ops import cuda_ext

    monkeypatch.delenv(gs_module.ENV_VAR, raising=False)
    monkeypatch.setattr(gs_module, "_triton_unavailable", lambda device: "simulated: no Triton")
    monkeypatch.setattr(cuda_ext, "_build", lambda: (None, "simulated: no nvcc"))
    cuda_ext._reset_for_tests()
    caplog.set_level(logging.WARNING, logger=gs_module.__name__)
    try:
        assert resolve_backend(None, device="cuda") == "torch"
        assert resolve_backend("auto", device="cuda") == "torch"
    finally:
        cuda_ext._reset_for_tests()
    fallbacks = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert len(fallbacks) == 1
    assert "'triton': simulated: no Triton" in fallbacks[0].getMessage()
    assert "'cuda': " in fallbacks[0].getMessage()


def test_auto_falls_back_along_the_preference_with_one_warning(
    no_extension, monkeypatch, caplog, rng
):
    monkeypatch.setitem(gs_module._AUTO_PREFERENCE, "cpu", ("cpu", "torch"))
    caplog.set_level(logging.WARNING, logger=gs_module.__name__)
    assert resolve_backend(None) == "torch"
    assert resolve_backend("auto") == "torch"
    dots, _ = ghost_score(*make_inputs(rng, 2, 1, 1, True))
    assert dots.shape == (2, 1)
    fallbacks = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert len(fallbacks) == 1
    assert "cannot import ffengine._C" in fallbacks[0].getMessage()


def test_named_cpu_without_extension_raises_with_reason(no_extension):
    with pytest.raises(BackendUnavailableError, match="cannot import ffengine._C"):
        resolve_backend("cpu")


def test_failed_self_check_disables_cpu(ext, monkeypatch, fresh_backend_state, caplog):
    def broken(h, delta, G_w, G_b):
        dots, sqnorm = ghost_score_torch(h, delta, G_w, G_b)
        return dots * 1.01, sqnorm

    monkeypatch.setattr(gs_module, "_ghost_score_cpu", broken)
    monkeypatch.setitem(gs_module._AUTO_PREFERENCE, "cpu", ("cpu", "torch"))
    monkeypatch.delenv(gs_module.ENV_VAR, raising=False)
    caplog.set_level(logging.WARNING, logger=gs_module.__name__)
    with pytest.raises(BackendUnavailableError, match="self-check failed: dots"):
        resolve_backend("cpu")
    assert resolve_backend(None) == "torch"
    assert any("self-check failed" in r.getMessage() for r in caplog.records)


def test_failed_self_check_disables_triton(monkeypatch, fresh_backend_state):
    def broken(h, delta, G_w, G_b):
        dots, sqnorm = ghost_score_torch(h, delta, G_w, G_b)
        return dots, sqnorm * 1.01

    monkeypatch.setattr(gs_module, "_triton_unavailable", lambda device: None)
    monkeypatch.setattr(gs_module, "_ghost_score_triton", broken)
    with pytest.raises(BackendUnavailableError, match="self-check failed: sqnorm"):
        resolve_backend("triton")
