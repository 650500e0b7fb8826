"""Experiment: would another threshold rule on the same scores do better than MAD with k?

    python bench/experiments/threshold_rules.py [--method last-max16x5] [CONFIG ...]

Reads the per-sample scores the harness commits (``bench/results/scores/<config>.npz``; every
configuration there where the attack took, unless configurations are named), so it needs no
pre-training cache and runs in seconds. The issue asks for a robust threshold on a
transformed score "if the tails demand it": the clean scores are heavy-tailed on the right
(clean target-class images), so MAD with k = 3 flags too many clean inputs and k = 6 too
few poisons on a weak backdoor. Rules, each on the method's scores:

* ``mad-k3`` / ``mad-k6``: the paper's rule, ``median + k · MAD``;
* ``lower-mad-kK``: the scale taken from the lower half only (``median − x`` for x below the
  median), which the poisons and the target-class tail cannot inflate;
* ``gmm2``: a two-component 1-D Gaussian mixture (EM, started from the top 10% against the
  rest), flagging where the upper component's posterior exceeds 1/2;
* ``mad-k6-otsu``: MAD with k = 6, then Otsu's split of the flagged scores (the cut that
  maximizes the between-group variance), flagging only the upper group: on a strong
  backdoor the poisons form a cluster above the clean target-class tail;
* ``mad-k6-otsu-gated``: the same only where the split is clear (Otsu's η, between-group
  over total variance, at least 0.74), otherwise ``mad-k6`` (``ffengine.detect.split``).
  Picked on 2026-12-03 after looking at the 10 runs that took with committed scores
  (docs/PREREGISTRATION.md, entry 4);
* ``oracle``: the best threshold, reading the truth (an upper bound, not a rule).

Prints DACC / FPR / FNR per rule and configuration, and each rule's worst case.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detection import load_scores, scored_configs  # noqa: E402

from ffengine.detect import flag  # noqa: E402
from ffengine.detect.split import OTSU_MIN_ETA, refine_by_split  # noqa: E402
from ffengine.metrics import best_threshold_dacc, detection_metrics  # noqa: E402


def _mask(n: int, ids: np.ndarray) -> np.ndarray:
    m = np.zeros(n, bool)
    m[ids] = True
    return m


def _lower_mad(x: np.ndarray, k: float) -> np.ndarray:
    med = np.median(x)
    below = med - x[x <= med]
    return x > med + k * np.median(below)


def _gmm2(x: np.ndarray, iters: int = 200) -> np.ndarray:
    hi = x > np.quantile(x, 0.9)
    mu = np.array([x[~hi].mean(), x[hi].mean()])
    sd = np.array([x[~hi].std(), x[hi].std()]) + 1e-12
    w = np.array([0.9, 0.1])
    for _ in range(iters):
        logp = -0.5 * ((x[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(w)
        post = np.exp(logp - logp.max(1, keepdims=True))
        post /= post.sum(1, keepdims=True)
        w = post.mean(0)
        mu = (post * x[:, None]).sum(0) / post.sum(0)
        sd = np.sqrt((post * (x[:, None] - mu) ** 2).sum(0) / post.sum(0)) + 1e-12
    upper = int(np.argmax(mu))
    return post[:, upper] > 0.5


def _mad_otsu(x: np.ndarray, k: float = 6.0, min_eta: float = 0.0) -> np.ndarray:
    refined, _ = refine_by_split(x, flag(x, k), min_eta)
    return _mask(len(x), refined)


RULES = {
    "mad-k3": lambda x: _mask(len(x), flag(x, 3.0)),
    "mad-k6": lambda x: _mask(len(x), flag(x, 6.0)),
    "lower-mad-k3": lambda x: _lower_mad(x, 3.0),
    "lower-mad-k6": lambda x: _lower_mad(x, 6.0),
    "gmm2": _gmm2,
    "mad-k6-otsu": _mad_otsu,
    "mad-k6-otsu-gated": lambda x: _mad_otsu(x, min_eta=OTSU_MIN_ETA),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*")
    p.add_argument("--method", default="last-max16x5")
    a = p.parse_args(argv)
    configs = a.configs or scored_configs()
    worst: dict[str, list[float]] = {}
    n_scored = 0
    for c in configs:
        s = load_scores(c)
        if a.method not in s["scores"]:  # CLIP runs have one draw: no max-over-draws method
            print(f"{c}: no {a.method} scores, skipped")
            continue
        n_scored += 1
        x = s["scores"][a.method].astype(np.float64)
        poisoned = s["poisoned"]
        print(f"{c} ({a.method}, {poisoned.sum()} poisons of {len(x)})")
        for name, rule in RULES.items():
            flagged = rule(x) & ~np.isnan(x)
            m = detection_metrics(np.flatnonzero(flagged), np.flatnonzero(poisoned), len(x))
            dacc, fpr, fnr = m["DACC"], m["FPR"], m["FNR"]
            w = worst.setdefault(name, [1.0, 0.0, 0.0])
            worst[name] = [min(w[0], dacc), max(w[1], fpr), max(w[2], fnr)]
            print(f"  {name:14s} DACC {dacc:.4f}  FPR {fpr:.4f}  FNR {fnr:.4f}  "
                  f"flagged {int(flagged.sum())}")
        oracle, _ = best_threshold_dacc(x, poisoned)
        w = worst.setdefault("oracle", [1.0, 0.0, 0.0])
        w[0] = min(w[0], oracle)
        print(f"  {'oracle':14s} DACC {oracle:.4f}")
    if n_scored:
        print(f"worst over {n_scored} configuration(s):")
        for name, (d, fp, fn) in worst.items():
            print(f"  {name:14s} DACC {d:.4f}" + ("" if name == "oracle" else
                                                   f"  FPR {fp:.4f}  FNR {fn:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
