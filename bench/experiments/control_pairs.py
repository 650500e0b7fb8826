"""Experiment: per-draw differential scores against control pairs, on a cached harness run.

    OMP_NUM_THREADS=1 python bench/experiments/control_pairs.py RUN_WORKDIR [DRAWS]

RUN_WORKDIR is a SimCLR configuration's cache directory of ``bench/detection.py`` (its
``data``, ``run`` and ``instances``). The false positives of every method so far are clean
images of the target class: once ``x_b`` sits in the target cluster, training on them raises
cos(x_b, x_r) too. A control pair that shares that effect but not the trigger could cancel
it. Two controls per instance, scored in the same pass (the engine's K axis, so every
variant sees the same views and negatives):

* ``clean``: ``x_b`` without its trigger (its source test image), the same ``x_r``;
* ``twin``: the clean target-class test image closest to ``x_b`` (not ``x_r``), the same
  ``x_r``: a pair already inside the target cluster, like ``(x_b, x_r)``.

FINDINGS.md reports the untriggered differential failing on summed scores (cos(x_b, x_r)
saturates, the clean term dominates). Here each term is first divided by its cosine
gradient's norm (so both are cosines between directions) and the difference is taken per
draw, before the max over draws: a poison's straddling draw keeps its trigger-to-target
pull while its target-target draws cancel like a clean truck's. Prints one line per variant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from ffengine.data.demo_data import demo_index
from ffengine.data.index import SampleIndex
from ffengine.detect import flag
from ffengine.engine.backdoor import embed_images
from ffengine.engine.instance import Instance, load_instance
from ffengine.engine.scoring import Engine
from ffengine.metrics import detection_metrics
from ffengine.run import Run


def control_instances(model, insts: list[Instance], test: SampleIndex, target: int):
    """The ``clean`` controls and, given a SimCLR ``model`` (None: CLIP), the ``twin`` ones."""
    keys = {k: i for i, k in enumerate(test.keys())}
    clean = [Instance(test.image(keys[inst.meta["x_b_source"]]), inst.x_r, {"control": "clean"})
             for inst in insts]
    if model is None:
        return clean, []
    targets = np.flatnonzero(test.labels == target)
    t_emb = embed_images(model, [test.image(int(j)) for j in targets], head=True)
    twin = []
    for inst in insts:
        b = embed_images(model, [inst.x_b], head=True)[0]
        order = np.argsort(-(t_emb @ b).numpy())
        r_key = inst.meta["x_r_source"]
        j = next(int(targets[o]) for o in order if test.key(int(targets[o])) != r_key)
        twin.append(Instance(test.image(j), inst.x_r, {"control": "twin"}))
    return clean, twin


def gradient_norms(state) -> np.ndarray:
    """Each stacked cosine gradient's norm (the first checkpoint's), (K,)."""
    g = state.grads[0]
    return torch.sqrt(sum((v.reshape(v.shape[0], -1) ** 2).sum(1) for v in g.values())).numpy()


def report(name, scores, truth, labels, target):
    clean = np.ones(len(labels), bool)
    clean[truth["poisoned_ids"]] = False
    for k in (3.0, 6.0):
        flagged = flag(scores, k)
        d = detection_metrics(flagged, truth["poisoned_ids"], truth["n"], scores=scores)
        hit = np.zeros(len(labels), bool)
        hit[flagged] = True
        print(f"{name:26s} k{k:g} AUC {d['ROC_AUC']:.4f} DACC {d['DACC']:.4f} "
              f"FPR {d['FPR']:.4f} FNR {d['FNR']:.4f} FNR@1%FPR {d['FNR_at_FPR_1pct']:.3f} "
              f"FPR target {hit[clean & (labels == target)].mean():.3f} "
              f"others {hit[clean & (labels != target) & (labels >= 0)].mean():.3f}", flush=True)


def main(work: Path, draws: int) -> None:
    truth = json.loads((work / "data" / "truth.json").read_text())
    index, run = SampleIndex(work / "data" / "index"), Run(work / "run")
    target = int(truth["attack"]["target_class"])
    insts = [load_instance(p) for p in sorted((work / "instances").glob("[0-9][0-9]"))]
    is_clip = truth["attack"].get("modality") == "clip"
    model = None if is_clip else run.load_model(run.checkpoints[-1])
    draws = 1 if is_clip else draws  # CLIP scores one fixed view
    with torch.no_grad():
        clean, twin = control_instances(model, insts, demo_index("test"), target)
    all_insts = insts + clean + twin
    out = work / f"control-pairs-d{draws}.npz"
    engine = Engine(run, checkpoints="last", draws=draws)
    norms = gradient_norms(engine.prepare(all_insts, index))
    if out.exists():
        terms = np.load(out)["terms"]
    else:
        terms = np.asarray(engine.score(index, all_insts).terms)[0]  # (D, n, 3K)
        np.savez(out, terms=terms, norms=norms)
    K = len(insts)
    unit = terms / norms  # cosines between the sample's and each instance's direction
    base, c_clean, c_twin = unit[..., :K], unit[..., K:2 * K], unit[..., 2 * K:]
    labels = index.labels
    for how in ("max", "mean")[: 1 if draws == 1 else 2]:
        agg = (lambda a: a.max(0)) if how == "max" else (lambda a: a.mean(0))
        report(f"base {how}", agg(terms[..., :K]).mean(1), truth, labels, target)
        report(f"unit {how}", agg(base).mean(1), truth, labels, target)
        report(f"unit-clean {how}", agg(base - c_clean).mean(1), truth, labels, target)
        if twin:
            report(f"unit-twin {how}", agg(base - c_twin).mean(1), truth, labels, target)
        report(f"unit-clean-after {how}", (agg(base) - agg(c_clean)).mean(1), truth, labels,
               target)
        if twin:
            report(f"unit-twin-after {how}", (agg(base) - agg(c_twin)).mean(1), truth, labels,
                   target)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 8)
