"""The engine on a CUDA device: full float32 (no TF32) and the same scores as on the CPU.

``ieee_float32``'s flag handling needs no GPU (the flags are process-wide settings), so it is
checked everywhere; the scores on a GPU against the CPU's are marked ``gpu`` and run where one
exists (``bench/gpu_session.sh`` on a lent GPU machine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffengine.detect import flag
from ffengine.engine.float32 import ieee_float32
from ffengine.engine.scoring import Engine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def restore_tf32_flags():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32)
    yield
    cudnn.allow_tf32, matmul.allow_tf32 = before


@pytest.mark.parametrize("caller_matmul_tf32", [False, True], ids=["default", "caller-high"])
def test_ieee_float32_turns_tf32_off_on_cuda_and_restores(restore_tf32_flags,
                                                          caller_matmul_tf32):
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    cudnn.allow_tf32, matmul.allow_tf32 = True, caller_matmul_tf32
    enabled, benchmark, deterministic = cudnn.enabled, cudnn.benchmark, cudnn.deterministic
    with ieee_float32("cuda:0"):
        assert not cudnn.allow_tf32 and not matmul.allow_tf32
        assert (cudnn.enabled, cudnn.benchmark, cudnn.deterministic) == (
            enabled, benchmark, deterministic)
    assert cudnn.allow_tf32 and matmul.allow_tf32 == caller_matmul_tf32
    with pytest.raises(KeyError), ieee_float32(torch.device("cuda")):
        raise KeyError("an error inside the block")
    assert cudnn.allow_tf32 and matmul.allow_tf32 == caller_matmul_tf32  # restored on error


def test_ieee_float32_leaves_cpu_settings_alone(restore_tf32_flags):
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
    with ieee_float32("cpu"):
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


@pytest.mark.gpu
def test_convolutions_under_the_guard_are_float32_accurate(rng, restore_tf32_flags):
    """TF32 (cuDNN's default for float32 convolutions) errs near 1e-3; float32 near 1e-6."""
    torch.backends.cudnn.allow_tf32 = True
    x = torch.randn(64, 64, 16, 16, generator=rng, dtype=torch.float64)
    w = torch.randn(64, 64, 3, 3, generator=rng, dtype=torch.float64)
    want = torch.nn.functional.conv2d(x, w, padding=1)
    with ieee_float32("cuda"):
        got = torch.nn.functional.conv2d(x.float().cuda(), w.float().cuda(), padding=1)
    err = float((got.cpu().double() - want).abs().max() / want.abs().max())
    assert err < 1e-5, f"conv under ieee_float32: scaled error {err:.2g}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_engine_scores_on_cuda_equal_the_cpu_scores(trace_setup, backend):
    """Two draws and both checkpoints of the tiny run, one undecodable sample: the GPU's
    scores are the CPU's up to float32 rounding (other kernels, other summation orders), the
    skipped sample is the same, and the MAD rule flags the same samples."""
    kw = dict(draws=2, progress=False, compile_backbone="off")
    index, inst = trace_setup["index"], [trace_setup["instance"]]
    cpu = Engine(trace_setup["run"], device="cpu", backend="torch", **kw).score(index, inst)
    gpu = Engine(trace_setup["run"], device="cuda", backend=backend, **kw).score(index, inst)
    assert gpu.backend == backend
    assert [i for i, _ in gpu.skipped] == [i for i, _ in cpu.skipped] != []
    ok = ~np.isnan(cpu.scores[:, 0])
    assert np.array_equal(ok, ~np.isnan(gpu.scores[:, 0]))
    err = np.abs(gpu.terms - cpu.terms)[:, :, ok].max() / np.abs(cpu.terms[:, :, ok]).max()
    assert err < 2e-5, f"terms on cuda ({backend}) vs cpu: scaled error {err:.2g}"
    assert np.array_equal(flag(gpu.detection_scores, 3.0), flag(cpu.detection_scores, 3.0))
