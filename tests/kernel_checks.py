"""What the fused-kernel test modules (Triton, CUDA) compare with: the materializing
reference in float64 on the CPU, and the error scaled by the reference's largest entry."""

from __future__ import annotations

import torch

from ffengine.reference import ghost_score_reference

# The convention for reduced precision: a kernel's error against a float64 reference is at
# most about twice that of plain PyTorch in the same dtype.
REDUCED_PRECISION_RATIO = 2.0


def reference_f64(h, delta, G_w, G_b):
    """The reference in float64 on the CPU, on the same (possibly rounded) inputs."""
    up = [None if t is None else t.cpu().double() for t in (h, delta, G_w, G_b)]
    return ghost_score_reference(*up)


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 for empty outputs)."""
    assert actual.shape == expected.shape
    if expected.numel() == 0:
        return 0.0
    err = float((actual.cpu().double() - expected).abs().max())
    return err / max(float(expected.abs().max()), 1e-300)
