"""heap_retained: large blocks reused from the heap, not mapped and zeroed again (glibc)."""

from __future__ import annotations

import ctypes
import resource

import pytest

from ffengine import heap
from ffengine.heap import heap_retained

BLOCK = 64 * 2**20  # bytes: above glibc's largest mmap threshold (32 MiB)


def _faults_of_second_block() -> int:
    """Minor page faults of writing a large malloc'd block after an equal one was written
    and freed."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    first = libc.malloc(BLOCK)
    ctypes.memset(first, 1, BLOCK)
    libc.free(first)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = libc.malloc(BLOCK)
    ctypes.memset(second, 1, BLOCK)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(second)
    return faults


@pytest.fixture
def glibc(monkeypatch):
    if heap._glibc_mallopt() is None:
        pytest.skip("the C library is not glibc")
    for name in heap.TUNING_ENV:
        monkeypatch.delenv(name, raising=False)


def test_freed_blocks_are_reused_inside_and_mapped_again_after(glibc):
    pages = BLOCK // resource.getpagesize()
    with heap_retained() as applied:
        assert applied
        inside = _faults_of_second_block()
    after = [_faults_of_second_block() for _ in range(2)]
    assert inside < pages // 20  # reused: no page of it faulted in again
    assert min(after) > pages // 2  # glibc's defaults again: a fresh mapping each time


def test_the_environments_malloc_tuning_stands(glibc, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    with heap_retained() as applied:
        assert not applied
