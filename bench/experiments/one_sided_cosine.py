"""Experiment (a dead end, kept so it can be re-run): one-sided cosine gradients against
the two-sided G of Eq. 5, on the bundled PE-II 10% demo run.

    OMP_NUM_THREADS=1 python bench/experiments/one_sided_cosine.py [WORKDIR]

The hypothesis: clean trucks (the target class) raise cos(f(x_b), f(x_r)) mostly by moving
x_r, a truck, so holding x_r's head output fixed ("b": only x_b moves) would keep the
poisons' signal and drop theirs ("r": only x_r moves, for symmetry). Final checkpoint,
max / mean over 8 augmentation draws, mean over 5 instances; the 3 × 5 stacked gradients
are scored in one pass (the engine's K axis), so the three variants see the same views.
Prints one line per (variant, aggregation, k). Measured results: docs/RESULTS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ffengine.attacks.poisoned_encoder import AttackConfig, load_truth, poison_dataset
from ffengine.data.demo_data import demo_index
from ffengine.data.index import SampleIndex
from ffengine.demo import bundled_run
from ffengine.engine import simclr_objective
from ffengine.engine.backdoor import find_instances, knn_bank
from ffengine.engine.head import scored_parameters
from ffengine.engine.scoring import Engine, aggregate_draws
from ffengine.run import Run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from control_pairs import report  # noqa: E402

SIDES = ("both", "b", "r")  # which head outputs the gradient flows through
N_INSTANCES = 5


def sided_cosine_gradients(model, x_b, x_r, layers):
    """Like ffengine.engine.cosine.cosine_gradients, for 3 × N_INSTANCES stacked pairs: the
    j-th pair's gradient flows through the side SIDES[j // N_INSTANCES]."""
    params = scored_parameters(model, layers)
    rows, coss = [], []
    for j, (xb, xr) in enumerate(zip(x_b, x_r, strict=True)):
        side = SIDES[j // N_INSTANCES]
        with torch.no_grad():
            hb, hr = model.features(xb.unsqueeze(0)), model.features(xr.unsqueeze(0))
        with torch.enable_grad():
            zb, zr = model.head(hb), model.head(hr)
            zb = zb.detach() if side == "r" else zb
            zr = zr.detach() if side == "b" else zr
            cos = F.cosine_similarity(zb, zr, dim=1).squeeze(0)
            g = torch.autograd.grad(-cos, [p for _, p in params], allow_unused=True)
        rows.append(tuple(torch.zeros_like(p) if t is None else t
                          for t, (_, p) in zip(g, params, strict=True)))
        coss.append(cos.detach())
    return ({n: torch.stack([r[j] for r in rows]) for j, (n, _) in enumerate(params)},
            torch.stack(coss))


def main(work: Path) -> None:
    cfg = AttackConfig(attack="pe2", poison_rate=0.10)
    if not (work / "data" / "truth.json").exists():
        poison_dataset(demo_index("train"), demo_index("aux"), work / "data", cfg)
    index, truth = SampleIndex(work / "data" / "index"), load_truth(work / "data")
    run = Run(bundled_run("pe2", 0.10))
    model = run.load_model(run.checkpoints[-1])
    bank, test = demo_index("train"), demo_index("test")
    insts = find_instances(model, cfg, bank, test, None, N_INSTANCES, knn=knn_bank(model, bank))
    simclr_objective.cosine_gradients = sided_cosine_gradients
    terms = np.asarray(Engine(run, checkpoints="last", draws=8).score(
        index, insts * len(SIDES)).terms)
    labels = index.labels
    for v, side in enumerate(SIDES):
        for how in ("max", "mean"):
            scores = aggregate_draws(terms[..., v * N_INSTANCES:(v + 1) * N_INSTANCES],
                                     how).mean(1)
            report(f"{side} {how}", scores, truth, labels, cfg.target_class)

if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "one-sided-cosine"))
