"""pytest-benchmark suite of the ghost score: reference vs. each backend at realistic shapes.

    pytest bench/bench_ghost_score.py --benchmark-group-by=param:d_out,param:K

Shapes: B=512 samples, V=2 views, d_in=512, d_out in {512, 128}, K in {1, 8} stacked
gradients, float32 (the dtype the engine scores in). The reference materializes every
per-sample gradient and is slow (seconds per call); it runs one timed round.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

import ffengine
from ffengine import _ext
from ffengine.ops import ghost_score
from ffengine.reference import ghost_score_reference

B, V, D_IN = 512, 2, 512
DTYPE = torch.float32


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.node()} {cpu} cores={os.cpu_count()} torch_threads={torch.get_num_threads()}"


@pytest.fixture(scope="module")
def inputs_cache() -> dict:
    return {}


def _inputs(cache: dict, d_out: int, K: int):
    key = (d_out, K)
    if key not in cache:
        gen = torch.Generator().manual_seed(0)
        cache[key] = (
            torch.randn(B, V, D_IN, generator=gen, dtype=DTYPE),
            torch.randn(B, V, d_out, generator=gen, dtype=DTYPE),
            torch.randn(K, d_out, D_IN, generator=gen, dtype=DTYPE),
            torch.randn(K, d_out, generator=gen, dtype=DTYPE),
        )
    return cache[key]


@pytest.mark.benchmark(group="ghost_score")
@pytest.mark.parametrize("K", [1, 8])
@pytest.mark.parametrize("d_out", [512, 128])
@pytest.mark.parametrize("impl", ["reference", "torch", "cpu"])
def test_ghost_score(benchmark, inputs_cache, impl, d_out, K):
    if impl == "cpu" and not _ext.extension_available():
        pytest.skip(f"compiled extension not built: {_ext.unavailable_reason()}")
    h, delta, G_w, G_b = _inputs(inputs_cache, d_out, K)
    if impl == "reference":
        fn, rounds = (lambda: ghost_score_reference(h, delta, G_w, G_b)), 1
    else:
        fn, rounds = (lambda: ghost_score(h, delta, G_w, G_b, backend=impl)), 5
    # All backends here run on the CPU and return when done: nothing to synchronize.
    benchmark.extra_info.update(
        machine=_machine(),
        dtype=str(DTYPE),
        shapes=dict(B=B, V=V, d_in=D_IN, d_out=d_out, K=K),
        version=ffengine.__version__,
        torch=torch.__version__,
        openmp=bool(getattr(_ext.load_extension(), "has_openmp", False)),
    )
    dots, sqnorm = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    assert dots.shape == (B, K) and sqnorm.shape == (B,)
