"""heap_retained: large blocks reused from the heap, not mapped and zeroed again (glibc)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ffengine import heap
from ffengine.heap import heap_retained

# In a fresh process (a long one's heap may hold free blocks large enough to serve the
# request whatever the settings): the minor page faults of writing a 64 MiB malloc'd block
# after an equal one was written and freed, inside heap_retained and after it.
PROBE = """
import ctypes, json, resource
from ffengine.heap import heap_retained

BLOCK = 64 * 2**20  # bytes: above glibc's largest mmap threshold (32 MiB)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def faults_of_second_block():
    first = libc.malloc(BLOCK)
    ctypes.memset(first, 1, BLOCK)
    libc.free(first)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = libc.malloc(BLOCK)
    ctypes.memset(second, 1, BLOCK)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(second)
    return faults

with heap_retained() as applied:
    inside = faults_of_second_block()
print(json.dumps({"applied": applied, "inside": inside,
                  "after": [faults_of_second_block() for _ in range(2)],
                  "pages": BLOCK // resource.getpagesize()}))
"""


@pytest.fixture
def glibc(monkeypatch):
    if heap._glibc_mallopt() is None:
        pytest.skip("the C library is not glibc")
    for name in heap.TUNING_ENV:
        monkeypatch.delenv(name, raising=False)


def test_freed_blocks_are_reused_inside_and_mapped_again_after(glibc):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["applied"]
    assert r["inside"] < r["pages"] // 20  # reused: no page of it faulted in again
    # glibc's defaults again: the heap is trimmed on free, each block a fresh mapping
    assert min(r["after"]) > r["pages"] // 2


def test_the_environments_malloc_tuning_stands(glibc, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    with heap_retained() as applied:
        assert not applied
