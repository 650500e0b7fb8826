"""Experiment: does fusing the default's scores with the earlier checkpoints' evidence rank
poisons above clean target-class images better? (No: docs/RESULTS.md.)

    python bench/experiments/score_fusion.py [CONFIG ...]

Reads the per-sample scores the harness commits (``bench/results/scores/<config>.npz``; every
SimCLR configuration there where the attack took, unless configurations are named): no
pre-training cache, seconds in all. Before the backdoor forms, a clean truck should not raise
cos(f(x_b), f(x_r)) (x_b is not in the truck cluster yet) while a poison builds the backdoor,
so the earlier checkpoints' evidence might demote the clean trucks the final checkpoint
promotes. The learning rate is constant, so ``paper-5inst`` − ``last-x5`` is the sum of the
earlier checkpoints' terms (epochs 15..60 of 75; one draw, 5 instances). Candidates, each a
combination of robust z-scores (median/MAD): the default's scores with Eq. 5's or with the
earlier checkpoints' (sum, or minimum: both must be high), and the 16 draws' maximum less half
their mean. Prints each candidate's AUC against all clean inputs and against clean
target-class ones, DACC at MAD k = 6 and the best threshold's DACC, per run and worst case.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detection import load_scores, scored_configs  # noqa: E402

from ffengine.detect import flag  # noqa: E402
from ffengine.metrics import detection_metrics, roc_auc  # noqa: E402

TARGET_CLASS = 9  # the grid's SimCLR runs that took all target class 9 (truck)
NEEDED = ("last-max16x5", "paper-5inst", "last-x5", "last-max16", "last-mean16")


def robust_z(x: np.ndarray) -> np.ndarray:
    med = np.nanmedian(x)
    return (x - med) / np.nanmedian(np.abs(x - med))


def candidates(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    s = {k: scores[k].astype(np.float64) for k in NEEDED}
    base, paper = robust_z(s["last-max16x5"]), robust_z(s["paper-5inst"])
    early = robust_z(s["paper-5inst"] - s["last-x5"])
    return {"default": s["last-max16x5"], "default+paper": base + paper,
            "min(default,paper)": np.minimum(base, paper), "default+early": base + early,
            "min(default,early)": np.minimum(base, early), "early": early,
            "max16-mean16/2": robust_z(s["last-max16"]) - 0.5 * robust_z(s["last-mean16"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*")
    a = p.parse_args(argv)
    configs = a.configs or scored_configs()
    worst: dict[str, list[tuple[float, ...]]] = {}
    for c in configs:
        s = load_scores(c)
        if not all(k in s["scores"] for k in NEEDED):
            continue
        pois, labels = s["poisoned"], s["labels"]
        trucks = ~pois & (labels == TARGET_CLASS)
        print(c)
        for name, x in candidates(s["scores"]).items():
            m = detection_metrics(flag(x, 6.0), np.flatnonzero(pois), len(x), scores=x)
            row = (m["ROC_AUC"], roc_auc(x[pois], x[trucks]), m["DACC"],
                   m["DACC_best_threshold"])
            worst.setdefault(name, []).append(row)
            print(f"  {name:20s} AUC {row[0]:.3f}  vs clean trucks {row[1]:.3f}  "
                  f"DACC k=6 {row[2]:.3f}  best {row[3]:.3f}")
    if worst:
        print(f"worst over {len(next(iter(worst.values())))} run(s) (mean AUC vs clean trucks):")
        for name, rows in worst.items():
            v = np.array(rows)
            print(f"  {name:20s} AUC {v[:, 0].min():.3f}  vs clean trucks {v[:, 1].min():.3f} "
                  f"({v[:, 1].mean():.3f})  DACC k=6 {v[:, 2].min():.3f}  "
                  f"best {v[:, 3].min():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
