"""pytest-benchmark suite of the ghost score: reference vs. each backend at realistic shapes.

    pytest bench/bench_ghost_score.py --benchmark-group-by=param:d_out,param:K

Shapes: B=512 samples, V=2 views, d_in=512, d_out in {512, 128}, K in {1, 8} stacked
gradients, float32 (the dtype the engine scores in): the projection head 512→512→128 of the
issue's kernel-level table. Each backend runs on its device: the reference, the torch
composite and the compiled "cpu" op on CPU tensors; where a GPU exists, the torch composite
and the Triton kernels on CUDA tensors too (the device is synchronized inside the timed
function). The reference materializes every per-sample gradient and is slow (seconds per
call): it runs two timed rounds.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch
from machine import cpu_name  # bench/machine.py: bench/ is on sys.path when these run

import ffengine
from ffengine import _ext
from ffengine.ops import ghost_score
from ffengine.reference import ghost_score_reference

B, V, D_IN = 512, 2, 512
DTYPE = torch.float32
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU; none is available")


def _machine(device: str) -> str:
    cpu = f"{cpu_name()} cores={os.cpu_count()} torch_threads={torch.get_num_threads()}"
    if device == "cuda":
        return f"{platform.node()} {torch.cuda.get_device_name()} (host: {cpu})"
    return f"{platform.node()} {cpu}"


@pytest.fixture(scope="module")
def inputs_cache() -> dict:
    return {}


def _inputs(cache: dict, d_out: int, K: int, device: str):
    key = (d_out, K, device)
    if key not in cache:
        gen = torch.Generator().manual_seed(0)
        cache[key] = tuple(
            torch.randn(*shape, generator=gen, dtype=DTYPE).to(device)
            for shape in ((B, V, D_IN), (B, V, d_out), (K, d_out, D_IN), (K, d_out))
        )
    return cache[key]


IMPLS = [
    pytest.param("reference", "cpu", id="reference-cpu"),
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("cpu", "cpu", id="cpu-cpu"),
    pytest.param("torch", "cuda", id="torch-cuda", marks=needs_gpu),
    pytest.param("triton", "cuda", id="triton-cuda", marks=needs_gpu),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=needs_gpu),
]


@pytest.mark.benchmark(group="ghost_score")
@pytest.mark.parametrize("K", [1, 8])
@pytest.mark.parametrize("d_out", [512, 128])
@pytest.mark.parametrize("impl, device", IMPLS)
def test_ghost_score(benchmark, inputs_cache, impl, device, d_out, K):
    if impl == "cpu" and not _ext.extension_available():
        pytest.skip(f"compiled extension not built: {_ext.unavailable_reason()}")
    h, delta, G_w, G_b = _inputs(inputs_cache, d_out, K, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        if impl == "reference":
            out = ghost_score_reference(h, delta, G_w, G_b)
        else:
            out = ghost_score(h, delta, G_w, G_b, backend=impl)
        sync()  # time the work, not the launch
        return out

    benchmark.extra_info.update(
        machine=_machine(device),
        device=device,
        dtype=str(DTYPE),
        shapes=dict(B=B, V=V, d_in=D_IN, d_out=d_out, K=K),
        version=ffengine.__version__,
        torch=torch.__version__,
        openmp=bool(getattr(_ext.load_extension(), "has_openmp", False)),
    )
    rounds = 2 if impl == "reference" else (50 if device == "cuda" else 10)
    warmup = 0 if impl == "reference" else 1
    dots, sqnorm = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert dots.shape == (B, K) and sqnorm.shape == (B,)
