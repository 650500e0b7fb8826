"""Channels-last against NCHW on this machine, rounds interleaved in one process (so the VM's
drift between runs does not enter the ratio): the engine (backend cpu, K = 1, eager and
compiled backbone), throughput.py's one-sample-at-a-time autograd baseline (``naive``), and
a training step of the backbone and head (forward and backward on 512 views).

    OMP_NUM_THREADS=2 python bench/experiments/memory_format_ab.py --model small
    OMP_NUM_THREADS=2 python bench/experiments/memory_format_ab.py --model resnet18

Prints one JSON object: images/s per variant and round. (2026-12-04, 2-core AMD EPYC VM,
two threads: bench/README.md, "Engine throughput".)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from throughput import _head, _naive_scores, build_setup  # noqa: E402

from ffengine.data.index import SampleIndex  # noqa: E402
from ffengine.engine import simclr_objective  # noqa: E402
from ffengine.engine.instance import load_instance  # noqa: E402
from ffengine.engine.scoring import Engine  # noqa: E402
from ffengine.models.resnet import MODEL_PRESETS, build_model  # noqa: E402
from ffengine.run import Run  # noqa: E402

FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def use_format(name: str) -> None:
    fmt = FORMATS[name]
    simclr_objective.backbone_memory_format = lambda device: fmt


def train_step_sps(model_name: str, fmt: str, views: int = 512) -> float:
    torch.manual_seed(0)
    net = build_model(MODEL_PRESETS[model_name]).train().to(memory_format=FORMATS[fmt])
    x = torch.randn(views, 3, 32, 32).contiguous(memory_format=FORMATS[fmt])
    times = []
    for _ in range(3):  # the first is a warm-up
        t0 = time.perf_counter()
        net.zero_grad()
        net(x).pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
    return views / min(times[1:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small", choices=["small", "resnet18"])
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    n = 2048 if a.model == "small" else 512
    root = Path(tempfile.mkdtemp())
    build_setup(root, a.model, n)
    run, index = Run(root / "run"), SampleIndex(root / "index")
    insts = [load_instance(root / "instances" / "00")]
    slow = _head(index, 64 if a.model == "small" else 16, root)

    def engine(compile_backbone: str) -> float:
        eng = Engine(run, checkpoints="last", backend="cpu", progress=False,
                     compile_backbone=compile_backbone)
        t0 = time.perf_counter()
        eng.score(index, insts, check_index=False)
        return 2 * n / (time.perf_counter() - t0)

    for fmt in FORMATS:  # warm-up: the compiled function specializes per layout
        use_format(fmt)
        engine("on")
    res: dict[str, list[float]] = {}
    for r in range(a.rounds):
        for fmt in (list(FORMATS) if r % 2 == 0 else list(FORMATS)[::-1]):
            use_format(fmt)
            for mode in ("on", "off"):
                res.setdefault(f"engine-compile-{mode}-{fmt}", []).append(engine(mode))
            seconds, images = _naive_scores(run, slow, insts, "cpu")
            res.setdefault(f"naive-{fmt}", []).append(images / seconds)
            res.setdefault(f"train-step-{fmt}", []).append(train_step_sps(a.model, fmt))
    print(json.dumps({"model": a.model, "threads": torch.get_num_threads(),
                      "images_per_s": {k: [round(v, 1) for v in vs] for k, vs in res.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
