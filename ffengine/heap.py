"""Keep glibc's malloc from handing large blocks back to the kernel during CPU training.

A CPU training step of the demo's model on 512 views allocates activations of 64 MiB and
more. glibc serves every block above its mmap threshold (32 MiB at most) with a fresh
mapping that the kernel zeroes page by page and unmaps on free, so each step faults in its
activations again: 2.2 million minor faults and a sixth of the CPU time in the kernel per
five steps on the 2-core dev VM (2026-12-04). Inside :func:`heap_retained`, large blocks
come from the heap and freed memory stays there for the next step: 4 epochs of the demo's
pre-training took 136 s instead of 183 (1.34x; the same weights bit for bit) for a peak
resident memory of 2.45 GiB instead of 1.42, which stayed flat over 16 epochs
(bench/README.md, "CPU: 64-view forwards, folded batch norms"). Scoring does not need it:
its backbone forwards are small enough to stay under the threshold.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

# mallopt parameters and glibc's defaults for them (malloc.h; mallopt(3))
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
# the environment's say over the same settings (mallopt(3), "ENVIRONMENT"): left alone if set
TUNING_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
              "GLIBC_TUNABLES")


def _glibc_mallopt():
    """glibc's ``mallopt``, or None where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it
        return libc.mallopt
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def heap_retained() -> Iterator[bool]:
    """Within: no block is served by its own mapping and the heap is never trimmed; on exit,
    glibc's defaults again. Yields whether that applied: not off glibc, nor where the
    environment tunes malloc itself (then its settings stand)."""
    mallopt = None if any(v in os.environ for v in TUNING_ENV) else _glibc_mallopt()
    applied = (mallopt is not None and mallopt(M_MMAP_MAX, 0) == 1
               and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1)
    try:
        yield applied
    finally:
        if mallopt is not None:
            mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)


__all__ = ["heap_retained"]
