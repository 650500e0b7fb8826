"""Where an engine pass spends its time, per operator, on CPU or GPU (torch.profiler).

    python bench/engine_profile.py --device cuda --n 4096 --workers 8 > profile.txt

Builds the throughput benchmark's setup (bench/throughput.py: a fresh ``--model``, ``--n``
random images), runs one warm-up pass (one-off compiles and caches), then profiles a second
``Engine.score`` pass and prints: its wall time and backbone images/s, the same for plain
inference on batches of 256 views, and the top operators by self device time and by self
host time (on a GPU, host time above device time means launches, not kernels, bound the
pass). Written for GPU sessions (bench/gpu_session.sh), where the engine ran at 0.05x plain
inference on 2026-12-04 (bench/README.md, "GPU").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from throughput import _sync, build_setup, measure  # bench/ is on sys.path when this runs
from torch.profiler import ProfilerActivity, profile

from ffengine.data.index import SampleIndex
from ffengine.engine.instance import load_instance
from ffengine.engine.scoring import Engine
from ffengine.run import Run


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
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "setup"
        build_setup(root, a.model, a.n)
        run, index = Run(root / "run"), SampleIndex(root / "index")
        insts = [load_instance(root / "instances" / f"{k:02d}") for k in range(a.K)]
        eng = Engine(run, checkpoints="last", backend=a.backend, progress=False,
                     device=device, workers=a.workers, compile_backbone=a.compile)
        t0 = time.perf_counter()
        eng.score(index, insts, check_index=False)
        _sync(device)
        print(f"warm-up pass: {time.perf_counter() - t0:.2f} s")

        # plain inference the way the throughput table measures it (float32, channels-last)
        inf = measure(root, "inference", "torch", 1, 0, str(device))["images_per_s"]

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            eng.score(index, insts, check_index=False)
            _sync(device)
            dt = time.perf_counter() - t0
    print(f"engine ({a.backend}, K={a.K}, compile {a.compile}, workers {a.workers}) on "
          f"{device}: {dt:.2f} s for {2 * a.n} backbone images = {2 * a.n / dt:.0f} img/s "
          f"under the profiler; plain inference {inf:.0f} img/s")
    ev = prof.key_averages()
    if device.type == "cuda":
        print("\n== by self device time")
        print(ev.table(sort_by="self_cuda_time_total", row_limit=a.rows, max_name_column_width=60))
    print("\n== by self host time")
    print(ev.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
