"""The few torch.distributed collectives that sharded tracing needs, behind one small class.

``ffengine trace`` under ``torchrun`` (or any launcher that sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) scores its share of the sample chunks in
every process. The library never initializes a process group by itself: :func:`current`
reads one the caller initialized (:func:`process_group_from_env` is the CLI's way of doing
so), and without one everything runs as a single process.

Collectives go through gloo on CPU and NCCL on CUDA (there, numpy arrays travel through the
rank's current CUDA device). Integer histograms are summed exactly in int64 by either.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as tdist

from ..errors import ConfigError, FFEngineError

__all__ = ["Dist", "SINGLE", "current", "local_device", "process_group_from_env"]

T = TypeVar("T")
DEFAULT_TIMEOUT = datetime.timedelta(hours=24)  # a rank may wait long for a straggler


@dataclass(frozen=True)
class Dist:
    """This process's place in a group of ``world_size`` scoring processes.

    ``device`` is where collective buffers live: CPU for gloo, the current CUDA device for
    NCCL. With ``world_size == 1`` every collective is the identity and no process group is
    needed.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            # A barrier as a tiny all-reduce: works for gloo and NCCL alike, with no device_ids.
            self.all_reduce_sum(np.zeros(1, np.int64))

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """The element-wise sum of ``array`` over all processes (a new array, same dtype)."""
        if not self.active:
            return array
        t = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t.cpu().numpy()

    def broadcast(self, obj: T, src: int = 0) -> T:
        """``obj`` of rank ``src`` on every process (picklable objects of our own making)."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src, device=self.device)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        if not self.active:
            return [obj]
        out: list = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def run_everywhere(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every process; if it raised an ffengine error on any of them, raise
        that error (the lowest rank's) on all of them, so that no process waits forever in a
        later collective for one that has given up."""
        err: FFEngineError | None = None
        result = None
        try:
            result = fn()
        except FFEngineError as e:
            if not self.active:
                raise
            err = e
        errors = self.all_gather(None if err is None else (type(err), str(err)))
        for r, e in enumerate(errors):
            if e is not None:
                if r == self.rank:
                    raise err  # the original, with its traceback
                cls, msg = e
                raise cls(f"rank {r}: {msg}")
        return result  # type: ignore[return-value]


SINGLE = Dist()


def current() -> Dist:
    """The initialized default process group as a :class:`Dist`, else :data:`SINGLE`."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return SINGLE
    backend = tdist.get_backend()
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
              else torch.device("cpu"))
    return Dist(tdist.get_rank(), tdist.get_world_size(), device)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; "
                          "launch with torchrun, which sets it.") from e


def local_device(device: str | torch.device) -> torch.device:
    """``device`` for this process: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under a
    launcher, so that the processes of one node use one GPU each."""
    dev = torch.device(device)
    local = _env_int("LOCAL_RANK")
    if dev.type == "cuda" and dev.index is None and local is not None:
        return torch.device("cuda", local)
    return dev


@contextlib.contextmanager
def process_group_from_env(device: str | torch.device = "cpu",
                           timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Iterator[Dist]:
    """Initialize the default process group from torchrun's variables (if ``WORLD_SIZE``
    > 1) for the duration of the block: NCCL when ``device`` is CUDA, gloo otherwise.
    Yields the :class:`Dist`; without a launcher, :data:`SINGLE`."""
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1 or (tdist.is_available() and tdist.is_initialized()):
        yield current()
        return
    if not tdist.is_available():
        raise ConfigError("WORLD_SIZE is set but this torch build has no torch.distributed; "
                          "run a single process instead.")
    dev = local_device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    tdist.init_process_group(backend=backend, timeout=timeout)
    try:
        yield current()
    finally:
        tdist.destroy_process_group()
