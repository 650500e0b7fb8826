"""Views per backbone forward on a CPU, rounds interleaved in one process (so the VM's drift
between runs does not enter the ratios): plain eager inference (the backbone as saved, and
with its batch norms folded as the engine runs it) and the engine (backend cpu, K = 1, eager
or compiled backbone) at each batch, with the process's system time and minor page faults.

Why: a forward over 256 32x32 views of the demo's model allocates activations of 32 MiB and
more, above glibc's largest mmap threshold, so every such tensor is a fresh mapping, zeroed
page by page by the kernel, and unmapped when freed: the engine profile on the dev VM showed
a fifth of the CPU time in the kernel (2026-12-04).

    OMP_NUM_THREADS=2 python bench/experiments/backbone_batch_ab.py --model small
    OMP_NUM_THREADS=2 python bench/experiments/backbone_batch_ab.py --model resnet18

Prints one JSON object: per variant and round, images/s, system seconds and minor faults.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from throughput import build_setup  # noqa: E402

from ffengine.data.index import SampleIndex  # noqa: E402
from ffengine.data.loader import iter_chunks  # noqa: E402
from ffengine.engine import simclr_objective  # noqa: E402
from ffengine.engine.instance import load_instance  # noqa: E402
from ffengine.engine.objective import objective_for  # noqa: E402
from ffengine.engine.scoring import Engine  # noqa: E402
from ffengine.engine.simclr_objective import backbone_memory_format  # noqa: E402
from ffengine.run import Run  # noqa: E402


def use_batch(views: int) -> None:
    """Every backbone forward of the engine takes ``views`` views on a CPU."""
    simclr_objective.backbone_batch = lambda device, size=32: views


def measured(fn, *args) -> dict:
    """images/s, system seconds and minor faults of ``fn(*args)`` (which returns its images)."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    images = fn(*args)
    t, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"sps": round(images / t, 1), "sys_s": round(r1.ru_stime - r0.ru_stime, 2),
            "user_s": round(r1.ru_utime - r0.ru_utime, 2),
            "minflt": r1.ru_minflt - r0.ru_minflt}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small", choices=["small", "resnet18"])
    p.add_argument("--batches", default="256,128,64,32,16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also the compiled engine")
    a = p.parse_args()
    n = 2048 if a.model == "small" else 512
    batches = [int(b) for b in a.batches.split(",")]
    root = Path(tempfile.mkdtemp())
    build_setup(root, a.model, n)
    run, index = Run(root / "run"), SampleIndex(root / "index")
    insts = [load_instance(root / "instances" / "00")]
    objective = objective_for(run)
    model = objective.load_model(run.checkpoints[-1])
    folded = objective.scoring_model(objective.load_model(run.checkpoints[-1]))
    fmt = backbone_memory_format("cpu")
    # the engine's views, as plain inference sees them: 2 per sample
    (chunk,) = list(iter_chunks(index, [list(range(n))]))
    x = (chunk.packed.select(range(n)).padded().float() / 255).repeat(2, 1, 1, 1)
    x = x.contiguous(memory_format=fmt)

    def inference(views: int, net: torch.nn.Module = model) -> int:
        with torch.inference_mode():
            for s in range(0, len(x), views):
                net.features(x[s: s + views])
        return len(x)

    def engine(mode: str) -> int:
        Engine(run, checkpoints="last", backend="cpu", progress=False,
               compile_backbone=mode).score(index, insts, check_index=False)
        return 2 * n

    modes = ["off"] + (["on"] if a.compile else [])
    for b in batches:  # warm-up: compiles, first-touch of the allocator's arenas
        use_batch(b)
        inference(b)
        for mode in modes:
            engine(mode)
    res: dict[str, list[dict]] = {}
    for r in range(a.rounds):
        for b in (batches if r % 2 == 0 else batches[::-1]):
            use_batch(b)
            res.setdefault(f"inference-{b}", []).append(measured(inference, b))
            res.setdefault(f"inference-folded-{b}", []).append(
                measured(inference, b, folded))
            for mode in modes:
                res.setdefault(f"engine-compile-{mode}-{b}", []).append(
                    measured(engine, mode))
    print(json.dumps({"model": a.model, "n": n, "threads": torch.get_num_threads(),
                      "results": res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
