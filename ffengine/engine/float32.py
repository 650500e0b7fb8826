"""Full float32 arithmetic for the engine's CUDA work: no TensorFloat-32.

PyTorch lets cuDNN run float32 convolutions in TF32 by default (10-bit mantissa, relative
error near 1e-3 on Ampere and Hopper GPUs), and users may switch cuBLAS matmuls to TF32 with
``torch.set_float32_matmul_precision("high")``. Either would move the backbone features, and
so every score, by about a thousand times the float32 rounding the engine promises (scores
equal on every device and backend up to float32 rounding), and could change the flagged set.
The engine's work on a CUDA device therefore runs inside :func:`ieee_float32`, which turns
TF32 off for its duration and restores the caller's settings after. bf16 autocast
(``precision="bfloat16"``) is unaffected: it chooses bf16 for its operations explicitly.

The legacy flags (``allow_tf32``) are used, not ``fp32_precision``: torch 2.11 to 2.14 refuse
to read the cuDNN flag once the new API has set conv and RNN apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def ieee_float32(device: torch.device | str) -> Iterator[None]:
    """TF32 off for cuDNN and cuBLAS while the block runs, where ``device`` is a CUDA device;
    elsewhere (CPU: no TF32) nothing changes."""
    if torch.device(device).type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    matmul_tf32 = matmul.allow_tf32
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                     benchmark_limit=cudnn.benchmark_limit,
                     deterministic=cudnn.deterministic, allow_tf32=False):
        if matmul_tf32:  # untouched unless the caller allowed it: nothing to restore then
            matmul.allow_tf32 = False
        try:
            yield
        finally:
            if matmul_tf32:
                matmul.allow_tf32 = True
