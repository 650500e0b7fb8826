"""pytest-benchmark suite of the whole engine: backbone images/s per backend, K and
backbone mode (eager or ``torch.compile``), and the backbone forward alone in both modes.

    pytest bench/bench_engine.py --benchmark-group-by=param:model

A fresh ``small`` (the demo's) model in the run format and 1,024 random 32×32 images, one
checkpoint, one draw; each round scores every image (2 views each). ``extra_info`` holds
the backbone images per call, so images/s = images / mean time. The warm-up round compiles
the backbone where ``compile_backbone="on"``, so the timed rounds are the steady state. The
one-JSON-object version with plain inference, the autograd reference and vmap beside it is
``python bench/throughput.py --json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import build_setup  # noqa: E402

from ffengine import _ext  # noqa: E402
from ffengine.data.index import SampleIndex  # noqa: E402
from ffengine.engine.instance import load_instance  # noqa: E402
from ffengine.engine.scoring import Engine  # noqa: E402
from ffengine.run import Run  # noqa: E402

N = 1024
BACKENDS = ["torch"] + (["cpu"] if _ext.extension_available() else [])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-bench")
    build_setup(root, "small", N)
    return root


@pytest.mark.parametrize("model", ["small"])
@pytest.mark.parametrize("compile_backbone", ["off", "on"])
@pytest.mark.parametrize("K", [1, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_score(benchmark, setup, backend, K, compile_backbone, model):
    run, index = Run(setup / "run"), SampleIndex(setup / "index")
    insts = [load_instance(setup / "instances" / f"{k:02d}") for k in range(K)]
    engine = Engine(run, checkpoints="last", backend=backend, progress=False,
                    compile_backbone=compile_backbone)
    benchmark.extra_info["backbone_images"] = 2 * N
    res = benchmark.pedantic(engine.score, args=(index, insts), rounds=3, warmup_rounds=1)
    assert res.scores.shape == (N, K)
    assert engine.backbone_compiled == (compile_backbone == "on"), engine.backbone_fallback


@pytest.mark.parametrize("model", ["small"])
@pytest.mark.parametrize("compiled", [False, True])
def test_backbone_forward(benchmark, setup, compiled, model):
    """The backbone alone on one 256-view batch: what compiling it buys before the rest of
    the engine (decode, augmentation, head) dilutes it."""
    from ffengine.engine.compiled_backbone import BackboneRunner

    run = Run(setup / "run")
    net = run.load_model(run.checkpoints[-1])
    x = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    runner = BackboneRunner(compiled=compiled)

    def forward():
        with torch.no_grad():
            return runner(net, x)

    benchmark.extra_info["backbone_images"] = 256
    out = benchmark.pedantic(forward, rounds=10, warmup_rounds=2)
    assert runner.compiled == compiled, runner.fallback_reason
    assert out.shape[0] == 256
