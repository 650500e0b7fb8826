"""The fused Triton ghost-score kernels against the materializing reference.

Without a GPU the kernels run in Triton's CPU interpreter, which needs ``TRITON_INTERPRET=1``
for the whole life of the process: Triton reads it when it defines its own ``@triton.jit``
helpers (``tl.sum``, ``tl.zeros``: at import), when it defines ours, and again in modules it
imports lazily on the first launch. Setting it halfway through a pytest process is therefore
unreliable, and leaving it set would change what other tests see. So the "interpreter" tests
run in this process only when it started with the variable set::

    TRITON_INTERPRET=1 pytest tests/test_triton_kernel.py

and otherwise ``test_interpreter_suite_in_child_process`` runs them in a child pytest with the
variable set (its failure shows the child's report). The "cuda" parametrization runs the same
tests compiled on a GPU in this process (marked ``gpu``: skipped where there is none).

Sizes stay small: the interpreter executes every program in numpy.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ffengine.errors import BackendUnavailableError
from ffengine.ops import ghost_score, ghost_score_torch, resolve_backend

from .conftest import TOLERANCES
from .kernel_checks import REDUCED_PRECISION_RATIO, reference_f64, scaled_error

pytest.importorskip("triton", reason="the Triton kernels need triton installed")

gs_module = importlib.import_module("ffengine.ops.ghost_score")

REPO = Path(__file__).resolve().parents[1]


# Set at process start (by the user, or by test_interpreter_suite_in_child_process).
INTERPRETER_HERE = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Kernels:
    module: ModuleType
    device: torch.device


@pytest.fixture(
    scope="module",
    params=["interpreter", pytest.param("cuda", marks=pytest.mark.gpu)],
)
def kernels(request) -> Iterator[Kernels]:
    """The kernels module, interpreted on CPU tensors or compiled on CUDA tensors."""
    module = importlib.import_module("ffengine.kernels.ghost_score")
    if request.param == "interpreter" and not module.interpreted():
        pytest.skip("no TRITON_INTERPRET=1: test_interpreter_suite_in_child_process runs these")
    if request.param == "cuda" and module.interpreted():
        pytest.skip("Triton runs in its interpreter in this process")
    gs_module._reset_backend_cache()
    yield Kernels(module, torch.device("cpu" if module.interpreted() else "cuda"))
    gs_module._reset_backend_cache()


@pytest.mark.skipif(INTERPRETER_HERE, reason="the interpreter tests run in this process")
def test_interpreter_suite_in_child_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    command += ["-k", "interpreter"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.skipif(INTERPRETER_HERE, reason="the interpreter keeps no specialization")
def test_kernels_compile_once_for_every_batch_size():
    """Triton compiles a kernel anew per kind of integer argument (1, a multiple of 16,
    other); a chunk's odd-sized last batches then recompiled every kernel mid-pass (5 s of
    an 8 s pass on an H200). The batch size must not be specialized on."""
    module = importlib.import_module("ffengine.kernels.ghost_score")
    for kernel in (module._ghost_score_kernel, module._ghost_sqnorm_kernel):
        unspecialized = {p.name for p in kernel.params if p.do_not_specialize}
        assert unspecialized == {"B"}, kernel


def make_inputs(gen, B, V, K, d_in, d_out, bias, dtype=torch.float32, device="cpu"):
    """Fresh float64 normals rounded to ``dtype``, on ``device``."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    return (
        randn(B, V, d_in),
        randn(B, V, d_out),
        randn(K, d_out, d_in),
        randn(K, d_out) if bias else None,
    )


def assert_matches(got, want, rtol=TOLERANCES[torch.float32]):
    for name, g, w in zip(("dots", "sqnorm"), got, want, strict=True):
        assert g.dtype == torch.float32, name
        err = scaled_error(g, w)
        assert err <= rtol, f"{name}: scaled error {err:.3g} > {rtol:g}"


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("B", [1, 3, 17])
@pytest.mark.parametrize("V", [1, 2])
@pytest.mark.parametrize("K", [1, 2, 8])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(kernels, B, V, K, bias, rng):
    # d_in = 37, d_out = 19: neither is a multiple of a block (both are padded to 64).
    inputs = make_inputs(rng, B, V, K, 37, 19, bias, device=kernels.device)
    got = kernels.module.ghost_score_triton(*inputs)
    assert got[0].device.type == kernels.device.type
    assert_matches(got, reference_f64(*inputs))


@pytest.mark.parametrize(
    "d_in, d_out",
    [(130, 130), (130, 19), (37, 130), (16, 16), (1, 1), (200, 3)],
    ids=lambda v: str(v),
)
def test_matches_reference_at_block_remainders(kernels, d_in, d_out, rng):
    """Several tiles of d_in and d_out with a ragged last one (130 = 2·64 + 2), exactly one
    tile, and dimensions far below tl.dot's minimum of 16."""
    inputs = make_inputs(rng, 17, 2, 3, d_in, d_out, True, device=kernels.device)
    assert_matches(kernels.module.ghost_score_triton(*inputs), reference_f64(*inputs))


@pytest.mark.parametrize("B, V", [(70, 2), (45, 1), (11, 3), (5, 5)])
def test_many_sample_blocks_and_padded_views(kernels, B, V, rng):
    """Several programs along the samples; V = 3 and 5 are padded to 4 and 8 view rows."""
    inputs = make_inputs(rng, B, V, 2, 21, 23, True, device=kernels.device)
    assert_matches(kernels.module.ghost_score_triton(*inputs), reference_f64(*inputs))


def test_strided_inputs(kernels, rng):
    """Any strides: a sliced h, a view-major delta, a transposed G_w and a strided G_b."""
    B, V, K, d_in, d_out = 9, 2, 3, 37, 19
    h, delta, G_w, G_b = make_inputs(rng, B, V, K, 2 * d_in, d_out, True, device=kernels.device)
    h = h[:, :, ::2]
    delta = delta.transpose(0, 1).contiguous().transpose(0, 1)
    G_w = G_w[:, :, ::2].transpose(1, 2).contiguous().transpose(1, 2)
    G_b = torch.stack([G_b, G_b], dim=-1)[..., 0]
    assert not any(t.is_contiguous() for t in (h, delta, G_w, G_b))
    got = kernels.module.ghost_score_triton(h, delta, G_w, G_b)
    assert_matches(got, reference_f64(h, delta, G_w, G_b))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_zero_delta_sample_scores_exactly_zero(kernels, bias, rng):
    h, delta, G_w, G_b = make_inputs(rng, 5, 2, 3, 37, 19, bias, device=kernels.device)
    delta[2] = 0
    dots, sqnorm = kernels.module.ghost_score_triton(h, delta, G_w, G_b)
    assert torch.all(dots[2] == 0) and sqnorm[2] == 0
    assert torch.all(sqnorm[[0, 1, 3, 4]] > 0)


@pytest.mark.parametrize("B, K", [(0, 3), (4, 0)])
def test_empty_batch_or_no_instances(kernels, B, K, rng):
    inputs = make_inputs(rng, B, 2, K, 37, 19, True, device=kernels.device)
    dots, sqnorm = kernels.module.ghost_score_triton(*inputs)
    assert dots.shape == (B, K) and sqnorm.shape == (B,)
    assert_matches((dots, sqnorm), reference_f64(*inputs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("V", [1, 2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_reduced_precision_within_twice_plain_torch(kernels, dtype, V, bias, rng):
    """float32 accumulation: at most 2x the error of ghost_score_torch on the same rounded
    inputs against the float64 reference. Since half-precision products are exact in
    float32, the kernel in fact meets the float32 tolerance on those rounded inputs."""
    inputs = make_inputs(rng, 17, V, 3, 130, 37, bias, dtype=dtype, device=kernels.device)
    want = reference_f64(*inputs)
    got = kernels.module.ghost_score_triton(*inputs)
    plain = ghost_score_torch(*inputs)
    for name, g, p, w in zip(("dots", "sqnorm"), got, plain, want, strict=True):
        assert g.dtype == torch.float32
        kernel_err, torch_err = scaled_error(g, w), scaled_error(p, w)
        assert kernel_err <= REDUCED_PRECISION_RATIO * torch_err, (
            f"{name}: kernel error {kernel_err:.3g} vs plain {dtype} torch {torch_err:.3g}"
        )
        assert kernel_err <= TOLERANCES[torch.float32], f"{name}: {kernel_err:.3g}"


# --------------------------------------------------------------------------- input checks


def test_rejects_float64_naming_the_argument(kernels, rng):
    inputs = make_inputs(rng, 2, 2, 1, 37, 19, True, dtype=torch.float64, device=kernels.device)
    message = "ghost_score_triton: argument 'h' has dtype torch.float64"
    with pytest.raises(ValueError, match=re.escape(message)):
        kernels.module.ghost_score_triton(*inputs)


@pytest.mark.parametrize(
    "case, message",
    [
        ("G_w_shape", "ghost_score_triton: argument 'G_w' must have shape (K, d_out, d_in)"),
        ("mixed_dtype", "ghost_score_triton: argument 'delta' must have dtype torch.float32"),
        ("G_b_shape", "ghost_score_triton: argument 'G_b' must have shape (K, d_out) = (2, 19)"),
        ("too_many_views", "the Triton kernel takes at most"),
    ],
)
def test_bad_inputs_raise_clear_error(kernels, case, message, rng):
    h, delta, G_w, G_b = make_inputs(rng, 3, 2, 2, 37, 19, True, device=kernels.device)
    if case == "G_w_shape":
        G_w = G_w[:, :, :-1]
    elif case == "mixed_dtype":
        delta = delta.bfloat16()
    elif case == "G_b_shape":
        G_b = G_b[:, :-1]
    else:
        V = kernels.module.MAX_VIEWS + 1
        h, delta, G_w, G_b = make_inputs(rng, 1, V, 1, 3, 3, False, device=kernels.device)
    with pytest.raises(ValueError, match=re.escape(message)):
        kernels.module.ghost_score_triton(h, delta, G_w, G_b)


def test_rejects_devices_it_cannot_run_on(kernels, rng):
    """Meta tensors always; on a GPU machine also CUDA tensors for interpreted kernels and
    CPU tensors for compiled ones."""
    cases = {"meta": "is on meta"}
    if torch.cuda.is_available():
        cases["cpu" if kernels.device.type == "cuda" else "cuda"] = "interpreter"
    for device, match in cases.items():
        inputs = make_inputs(rng, 2, 2, 1, 5, 3, False, device=device)
        with pytest.raises(ValueError, match=match):
            kernels.module.ghost_score_triton(*inputs)


# --------------------------------------------------------------------------- dispatch


def test_public_op_runs_triton_by_name(kernels, rng, monkeypatch):
    monkeypatch.delenv(gs_module.ENV_VAR, raising=False)
    assert resolve_backend("triton", device=kernels.device) == "triton"
    inputs = make_inputs(rng, 6, 2, 3, 37, 19, True, device=kernels.device)
    assert_matches(ghost_score(*inputs, backend="triton"), reference_f64(*inputs))


def test_public_op_casts_to_the_input_dtype(kernels, rng):
    inputs = make_inputs(
        rng, 6, 2, 3, 37, 19, True, dtype=torch.bfloat16, device=kernels.device
    )
    dots, sqnorm = ghost_score(*inputs, backend="triton")
    assert dots.dtype == sqnorm.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "dtype, requires_grad, message",
    [
        (torch.float64, False, "supports float32, bfloat16 and float16"),
        (torch.float32, True, "not differentiable"),
    ],
)
def test_named_triton_refuses_unsuitable_inputs(kernels, dtype, requires_grad, message, rng):
    h, delta, G_w, G_b = make_inputs(
        rng, 3, 2, 2, 37, 19, True, dtype=dtype, device=kernels.device
    )
    h.requires_grad_(requires_grad)
    with pytest.raises(BackendUnavailableError, match=message):
        ghost_score(h, delta, G_w, G_b, backend="triton")


def test_auto_choice_on_this_device(kernels, monkeypatch, caplog):
    """On CUDA auto takes Triton; on CPU the compiled op (torch where it is not built),
    never the interpreter, even when it is available."""
    from ffengine import _ext

    monkeypatch.delenv(gs_module.ENV_VAR, raising=False)
    on_cpu_built = kernels.device.type == "cpu" and _ext.extension_available()
    want = "triton" if kernels.device.type == "cuda" else ("cpu" if on_cpu_built else "torch")
    assert resolve_backend(None, device=kernels.device) == want
    fallbacks = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    # the one fallback there may be: past a compiled op that is not built
    assert fallbacks == [] if want != "torch" else all("ffengine._C" in m for m in fallbacks)


@pytest.mark.gpu
def test_float32_dots_do_not_use_tf32(kernels, rng):
    """A wide layer where TF32's 10-bit mantissa would break the float32 tolerance."""
    if kernels.device.type != "cuda":
        pytest.skip("TF32 exists only on the GPU")
    inputs = make_inputs(rng, 64, 2, 8, 512, 512, True, device=kernels.device)
    assert_matches(kernels.module.ghost_score_triton(*inputs), reference_f64(*inputs))
