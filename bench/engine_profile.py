"""Where an engine pass spends its time, on CPU or GPU: phases, then operators.

    python bench/engine_profile.py --device cuda --n 8192 --workers 8 > profile.txt

Builds the throughput benchmark's setup (bench/throughput.py: a fresh ``--model``, ``--n``
random images), runs one warm-up pass (one-off compiles and caches), then times, without
the profiler:

* the engine fed by its loader (``--workers`` decoding processes), and how long it waited
  for decoded chunks;
* the engine fed from memory (every chunk decoded beforehand): its compute alone (with
  ``torch.backends.cudnn.benchmark`` on, it ran 13% slower on an H200, 2026-12-04: not
  measured any more);
* decoding alone through the loader;
* plain inference in full float32 (as the throughput table and the engine compute) on
  batches of 256 views and of the engine's (bench/throughput.py ``inference_batch``), the
  latter also with the batch norms folded (as the engine runs the backbone) and with
  PyTorch's default TF32 convolutions.

Then it profiles one engine pass fed from memory and prints the top operators by self
device time and by self host time (on a GPU, host time above device time means launches
and synchronizations, not kernels, bound the pass). Written for GPU sessions
(bench/gpu_session.sh), where the engine ran at 0.05x plain inference on 2026-12-04
(bench/README.md, "GPU").
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch
from throughput import (  # bench/ is on sys.path when this runs
    _sync,
    build_setup,
    fed_engine,
    inference_batch,
)
from torch.profiler import ProfilerActivity, profile

from ffengine.data.index import SampleIndex
from ffengine.data.loader import iter_chunks
from ffengine.engine.float32 import ieee_float32
from ffengine.engine.instance import load_instance
from ffengine.engine.objective import objective_for
from ffengine.engine.scoring import Engine
from ffengine.engine.simclr_objective import backbone_memory_format
from ffengine.run import Run


def _timed_pass(eng: Engine, index, insts, device, batches=None) -> tuple[float, float]:
    """(seconds, seconds waiting for data) of one Engine.score pass."""
    waits: list[float] = []
    with fed_engine(batches, waits):
        t0 = time.perf_counter()
        eng.score(index, insts, check_index=False)
        _sync(device)
        return time.perf_counter() - t0, sum(waits)


def _inference_sps(run: Run, device, views: int, tf32: bool, batch: int,
                   folded: bool = False) -> float:
    """Plain backbone images/s on batches of ``batch`` views, as bench/throughput.py
    measures it (full float32 unless ``tf32``: PyTorch's default cuDNN convolutions then;
    ``folded``: batch norms folded into the convolutions, as the engine runs it)."""
    fmt = backbone_memory_format(device)
    model = run.load_model(run.checkpoints[-1], device).to(memory_format=fmt)
    if folded:
        model = objective_for(run).scoring_model(model)
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    precision = contextlib.nullcontext() if tf32 else ieee_float32(device)
    with torch.inference_mode(), precision:
        model.features(x)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(max(1, views // batch)):
            model.features(x)
        _sync(device)
        return batch * max(1, views // batch) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="small")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--backend", default="torch")
    p.add_argument("--K", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--compile", default="off", choices=["off", "on"])
    p.add_argument("--rows", type=int, default=30)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    print(f"== engine_profile: model {a.model}, n {a.n}, backend {a.backend}, K {a.K}, "
          f"compile {a.compile}, workers {a.workers}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "setup"
        build_setup(root, a.model, a.n)
        run, index = Run(root / "run"), SampleIndex(root / "index")
        insts = [load_instance(root / "instances" / f"{k:02d}") for k in range(a.K)]
        eng = Engine(run, checkpoints="last", backend=a.backend, progress=False,
                     device=device, workers=a.workers, compile_backbone=a.compile)
        images = 2 * a.n  # backbone images of a pass (2 views, 1 draw, 1 checkpoint)

        def line(what: str, seconds: float, extra: str = "") -> None:
            print(f"{what:52s} {seconds:7.2f} s  {images / seconds:9.0f} img/s{extra}",
                  flush=True)

        dt, _ = _timed_pass(eng, index, insts, device)
        line("warm-up pass (one-off costs included)", dt)
        dt, wait = _timed_pass(eng, index, insts, device)
        line(f"engine, loader with {a.workers} workers", dt, f"  (waiting for data {wait:.2f} s)")
        t0 = time.perf_counter()
        batches = list(iter_chunks(index, eng.chunks(a.n), workers=a.workers,
                                   pin_memory=device.type == "cuda"))
        line(f"decoding alone, {a.workers} workers", time.perf_counter() - t0)
        dt, _ = _timed_pass(eng, index, insts, device, batches)
        line("engine, data in memory", dt)
        big = inference_batch(device)
        rows = [("float32, batch 256", False, 256, False)] * (big != 256) + [
            (f"float32, batch {big}", False, big, False),
            (f"float32, batch {big}, BN folded (the engine's)", False, big, True),
            (f"TF32 (cuDNN's default), batch {big}", True, big, False)]
        for what, tf32, batch, folded in rows:
            sps = _inference_sps(run, device, images, tf32, batch, folded)
            print(f"{'plain inference, ' + what:52s} {images / sps:7.2f} s  {sps:9.0f} img/s",
                  flush=True)

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            dt, _ = _timed_pass(eng, index, insts, device, batches)
        line("engine, data in memory, under the profiler", dt)
    ev = prof.key_averages()
    if device.type == "cuda":
        print("\n== by self device time")
        print(ev.table(sort_by="self_cuda_time_total", row_limit=a.rows, max_name_column_width=60))
    print("\n== by self host time")
    print(ev.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
