"""The compiled engine with its augmentation's colour stage compiled against eager, rounds
interleaved in one process (so the VM's drift between runs does not enter the ratio), beside
plain backbone inference (eager and compiled, batches of 256 views, as bench/throughput.py
measures it): the issue's ratio of the engine to inference, per round.

    OMP_NUM_THREADS=2 python bench/experiments/compiled_colour_ab.py --model small

Prints one JSON object: backbone images/s per variant and round, and the share of each
engine pass spent making views (``augment_batch``, wall clock: the part the variants
change, which the VM's drift between passes can hide in the totals). The engine runs the
`cpu` ghost op and the `torch` composite, K = 1, the last checkpoint, one draw.
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
from throughput import build_setup  # noqa: E402

from ffengine.data.index import SampleIndex  # noqa: E402
from ffengine.engine import scoring, simclr_objective  # noqa: E402
from ffengine.engine.compiled_backbone import ColourRunner  # noqa: E402
from ffengine.engine.instance import load_instance  # noqa: E402
from ffengine.engine.scoring import Engine  # noqa: E402
from ffengine.engine.simclr_objective import backbone_memory_format  # noqa: E402
from ffengine.run import Run  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small", choices=["small", "resnet18"])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp())
    build_setup(root, a.model, a.n)
    run, index = Run(root / "run"), SampleIndex(root / "index")
    insts = [load_instance(root / "instances" / "00")]
    fmt = backbone_memory_format("cpu")
    model = run.load_model(run.checkpoints[-1]).to(memory_format=fmt)
    x = torch.rand(256, 3, 32, 32).contiguous(memory_format=fmt)
    compiled_forward = torch.compile(model.features)

    def inference(forward) -> float:
        with torch.inference_mode():
            forward(x)
            t0 = time.perf_counter()
            for _ in range(2 * a.n // 256):
                forward(x)
            return 256 * (2 * a.n // 256) / (time.perf_counter() - t0)

    augment = simclr_objective.augment_batch
    augment_s = [0.0]

    def timed_augment(*args, **kwargs):
        t0 = time.perf_counter()
        out = augment(*args, **kwargs)
        augment_s[0] += time.perf_counter() - t0
        return out

    simclr_objective.augment_batch = timed_augment
    shares: dict[str, list[float]] = {}

    def engine(backend: str, colour: str) -> float:
        # "eager": the compiled backbone fed by the eager colour stage (as before 2026-12-04)
        scoring.ColourRunner = ColourRunner if colour == "compiled" else (
            lambda compiled: ColourRunner(False))
        eng = Engine(run, checkpoints="last", backend=backend, progress=False,
                     compile_backbone="on")
        augment_s[0] = 0.0
        t0 = time.perf_counter()
        eng.score(index, insts, check_index=False)
        dt = time.perf_counter() - t0
        assert eng.backbone_compiled and eng.colour_compiled == (colour == "compiled")
        shares.setdefault(f"engine-{backend}-colour-{colour}", []).append(
            round(augment_s[0] / dt, 4))
        return 2 * a.n / dt

    variants = [(b, c) for b in ("cpu", "torch") for c in ("compiled", "eager")]
    for b, c in variants:  # warm-up: compiles everything once
        engine(b, c)
    inference(compiled_forward)
    shares.clear()
    res: dict[str, list[float]] = {}
    for r in range(a.rounds):
        for b, c in (variants if r % 2 == 0 else variants[::-1]):
            res.setdefault(f"engine-{b}-colour-{c}", []).append(engine(b, c))
        res.setdefault("inference-eager", []).append(inference(model.features))
        res.setdefault("inference-compiled", []).append(inference(compiled_forward))
    ratios = {f"{k}/inference-eager": [round(v / e, 3) for v, e in
                                       zip(vs, res["inference-eager"], strict=True)]
              for k, vs in res.items() if k.startswith("engine")}
    print(json.dumps({"model": a.model, "n": a.n, "threads": torch.get_num_threads(),
                      "images_per_s": {k: [round(v, 1) for v in vs] for k, vs in res.items()},
                      "per_round_ratio": ratios, "augment_share": shares}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
