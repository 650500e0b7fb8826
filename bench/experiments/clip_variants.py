"""Experiment: why clean target-class pairs outscore the poisons on CLIP, and what removes it.

    OMP_NUM_THREADS=1 python bench/experiments/clip_variants.py CLIP_RUN_WORKDIR

CLIP_RUN_WORKDIR is a CLIP configuration's cache directory of ``bench/detection.py``. On
Carlini-Terzis 5% the poisons score below the clean truck/"truck" pairs (AUC of poisons
against clean target-class pairs ≈ 0.06): training on a clean truck pair pulls truck images
towards the caption "truck", which also pulls x_r (a truck) and x_b (already mapped there)
together. Variants, scored in one pass (the engine's K axis) on every checkpoint:

* ``both``: the paper's G (x_b's and x_r's embeddings both move);
* ``b`` / ``r``: one-sided G, only x_b's (x_r's) embedding moves;
* ``clean``: the paper's G for (x_b without its trigger, x_r), subtracted per instance after
  dividing each term by its G's norm (a control that shares the truck pull, not the trigger);
* ``clean-b``: the same with one-sided G (only x_b and its untriggered self move).

Prints, per variant, the metrics of the Eq. 5 sum and of the last checkpoint alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ffengine.data.demo_data import demo_index
from ffengine.data.index import SampleIndex
from ffengine.engine import clip_objective
from ffengine.engine.instance import Instance, load_instance
from ffengine.engine.scoring import Engine
from ffengine.models.clip import linear_layout_grads, scored_linears
from ffengine.run import Run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from control_pairs import report  # noqa: E402

SIDES = ("both", "b", "r", "clean", "clean-b")


def sided_gradients(n_inst: int):
    """clip_cosine_gradients for len(SIDES) × n_inst stacked pairs; pair j's gradient flows
    through the side SIDES[j // n_inst] ("clean" pairs: both sides)."""
    def grads(model, x_b, x_r, layers=None):
        lins = scored_linears(model, layers)
        params = [p for s in lins for p in s.params()]
        per_k, coss = [], []
        for j, (xb, xr) in enumerate(zip(x_b, x_r, strict=True)):
            side = SIDES[j // n_inst]
            with torch.enable_grad():
                e = model.encode_image(torch.stack([xb, xr]))
                eb, er = e[:1], e[1:]
                eb = eb.detach() if side == "r" else eb
                er = er.detach() if side in ("b", "clean-b") else er
                cos = F.cosine_similarity(eb, er, dim=1).squeeze(0)
                g = torch.autograd.grad(-cos, params, allow_unused=True)
            per_k.append(linear_layout_grads(lins, g))
            coss.append(cos.detach())
        names = [n for s in lins for n in s.param_names()]
        return ({n: torch.stack([g[j] for g in per_k]).contiguous()
                 for j, n in enumerate(names)}, torch.stack(coss))
    return grads


def main(work: Path) -> None:
    truth = json.loads((work / "data" / "truth.json").read_text())
    index, run = SampleIndex(work / "data" / "index"), Run(work / "run")
    target = int(truth["attack"]["target_class"])
    insts = [load_instance(p) for p in sorted((work / "instances").glob("[0-9][0-9]"))]
    test = demo_index("test")
    keys = {k: i for i, k in enumerate(test.keys())}
    clean = [Instance(test.image(keys[i.meta["x_b_source"]]), i.x_r, {}) for i in insts]
    K = len(insts)
    all_insts = insts * 3 + clean * 2
    clip_objective.clip_cosine_gradients = sided_gradients(K)
    engine = Engine(run, checkpoints="all")
    out = work / "clip-variants.npz"
    if out.exists():
        z = np.load(out)
        terms, norms = z["terms"], z["norms"]
    else:
        state = engine.prepare(all_insts, index)
        norms = np.stack([torch.sqrt(sum((v.reshape(K * len(SIDES), -1) ** 2).sum(1)
                                         for v in g.values())).numpy() for g in state.grads])
        terms = np.asarray(engine.score(index, all_insts).terms)[:, 0]  # (T, n, 4K)
        np.savez(out, terms=terms, norms=norms)
    labels = index.labels
    unit = terms / norms[:, None, :]
    for v, side in enumerate(SIDES[:3]):
        sl = slice(v * K, (v + 1) * K)
        report(f"{side} sum", terms[..., sl].sum(0).mean(1), truth, labels, target)
        report(f"{side} last", terms[-1, :, sl].mean(1), truth, labels, target)
    diff = unit[..., :K] - unit[..., 3 * K:4 * K]
    report("unit-clean sum", diff.sum(0).mean(1), truth, labels, target)
    report("unit-clean last", diff[-1].mean(1), truth, labels, target)
    diff = unit[..., K:2 * K] - unit[..., 4 * K:]
    report("unit-b-clean-b sum", diff.sum(0).mean(1), truth, labels, target)
    report("unit-b-clean-b last", diff[-1].mean(1), truth, labels, target)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
