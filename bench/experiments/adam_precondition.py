"""Experiment: score with the cosine gradient preconditioned by the checkpoint's Adam state.

    python bench/experiments/adam_precondition.py [--draws 8] CONFIG [CONFIG ...]

CONFIG names a SimCLR configuration cached by ``bench/detection.py`` (its run, saved with
the Adam moments beside each checkpoint, its data and its 5 instances). Under Adam a
sample's gradient moves the parameters by about ``lr · g_i / (sqrt(v̂) + ε)``, not
``lr · g_i``, so the first-order change of cos(f(x_b), f(x_r)) it causes is
``⟨G / (sqrt(v̂) + ε), g_i⟩``: the same ghost score with the cosine gradient ``G`` divided,
coordinate by coordinate, by the final checkpoint's Adam denominator (``v̂ = exp_avg_sq /
(1 - β2^step)``), and ``‖g_i‖`` left as the normalizer. Coordinates that many samples move
(large ``v``) count less, rarely moved ones more; the hope is that the trigger's
coordinates are the rare ones and the clean target-class images' the common ones.

Both scores come from one pass: the K preconditioned gradients are stacked after the K
plain ones, so the two share the views, batches and negatives. The plain half must equal
the cached ``last-d16`` trace's first ``--draws`` draws (checked). Prints, for the default
reduction (maximum over draws, mean over instances) of each, the AUC against all clean
inputs and against clean target-class ones, the FNR at 1% FPR, DACC / FPR / FNR with
MAD k = 6 and the best threshold's DACC.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ffengine.attacks.poisoned_encoder import load_truth
from ffengine.data.index import SampleIndex
from ffengine.detect import flag
from ffengine.engine.instance import load_instance
from ffengine.engine.scoring import Engine
from ffengine.metrics import detection_metrics, roc_auc

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "detection"


def adam_denominators(model: torch.nn.Module, optim_path: Path) -> dict[str, torch.Tensor]:
    """{parameter name: sqrt(v̂) + ε} from a saved ``torch.optim.Adam`` state whose
    parameters are ``model.parameters()`` in order (how pre-training builds it)."""
    sd = torch.load(optim_path, weights_only=True, map_location="cpu")
    group = sd["param_groups"][0]
    beta2, eps = group["betas"][1], group["eps"]
    names = [n for n, _ in model.named_parameters()]
    if len(names) != len(group["params"]):
        raise ValueError(f"{optim_path}: {len(group['params'])} optimizer parameters, "
                         f"the model has {len(names)}")
    out = {}
    for name, idx in zip(names, group["params"], strict=True):
        st = sd["state"][idx]
        step = float(st["step"])
        out[name] = (st["exp_avg_sq"] / (1 - beta2 ** step)).sqrt() + eps
    return out


def with_preconditioned(engine: Engine) -> None:
    """Make ``engine.prepare``, given the K instances twice, precondition the second K
    cosine gradients (instances K..2K-1)."""
    plain = engine.prepare

    def prepare(instances, index):
        state = plain(instances, index)
        k = len(instances) // 2
        for t, ckpt in enumerate(engine.checkpoints):
            den = adam_denominators(state.models[t], ckpt.optimizer)
            state.grads[t] = {n: torch.cat([g[:k], g[:k] / den[n].to(g)])
                              for n, g in state.grads[t].items()}
        return state

    engine.prepare = prepare


def report(name: str, det: np.ndarray, truth: dict, poison: np.ndarray,
           target: np.ndarray) -> None:
    d = detection_metrics(flag(det, 6.0), truth["poisoned_ids"], truth["n"], scores=det)
    thr = np.quantile(det[~poison], 0.99)
    vs_target = roc_auc(det[poison], det[target])
    print(f"  {name:14s} AUC {d['ROC_AUC']:.4f}  vs clean target {vs_target:.4f}"
          f"  FNR@1%FPR {(det[poison] <= thr).mean():.3f}  k=6: DACC {d['DACC']:.4f} "
          f"FPR {d['FPR']:.4f} FNR {d['FNR']:.4f}  best DACC {d['DACC_best_threshold']:.4f}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+")
    p.add_argument("--draws", type=int, default=8)
    a = p.parse_args(argv)
    for config in a.configs:
        work = CACHE / config
        truth = load_truth(work / "data")
        index = SampleIndex(work / "data" / "index")
        poison = np.zeros(truth["n"], bool)
        poison[truth["poisoned_ids"]] = True
        target = ~poison & (index.labels == truth["attack"]["target_class"])
        instances = [load_instance(d) for d in sorted((work / "instances").iterdir())
                     if d.is_dir()]
        engine = Engine(work / "run", checkpoints="last", draws=a.draws, progress=False)
        with_preconditioned(engine)
        terms = engine.score(index, instances + instances).terms[0]  # (D, n, 2K)
        k = len(instances)
        cached = np.load(work / "traces" / "v2-last-d16" / "terms.npy", mmap_mode="r")[0]
        diff = np.abs(terms[:, :, :k] - cached[: a.draws]).max() / np.abs(cached).max()
        print(f"{config} ({k} instances, {a.draws} draws; plain vs cached terms: "
              f"max |diff| / max {diff:.1e})")
        report("plain", terms[:, :, :k].max(0).mean(1), truth, poison, target)
        report("adam", terms[:, :, k:].max(0).mean(1), truth, poison, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
