"""Experiment: is the instances' minimum a better ranking, or only a stricter threshold?

    python bench/experiments/min_vs_mean_k.py [CONFIG ...]

Reads the per-sample scores the harness commits (``bench/results/scores/<config>.npz``; every
configuration where the attack took and both methods were measured, unless configurations
are named). For ``last-max16min5-k6`` (minimum over 5 instances, MAD k = 6) it takes the FPR
its MAD rule reaches, then asks what the default ``last-max16x5-k6`` (mean over instances)
gives at that same FPR: its FNR there, and the MAD multiplier k that reaches it. If the mean
misses no more poisons at the minimum's FPR, the minimum's gain in DACC comes from its
operating point (what a larger k does to the mean), not from ranking the poisons better.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detection import SCORES_DIR, load_results, load_scores  # noqa: E402

from ffengine.detect.mad import flag  # noqa: E402

MEAN, MIN = "last-max16x5-k6", "last-max16min5-k6"


def compare(scores: dict[str, np.ndarray], poisoned: np.ndarray, k: float = 6.0) -> dict:
    """The minimum's (FPR, FNR) under MAD with ``k``, and the mean's FNR and k at that FPR."""
    mn, mean = scores[MIN], scores[MEAN]
    flagged = np.zeros(len(mn), bool)
    flagged[flag(mn, k)] = True
    fpr = float(flagged[~poisoned].mean())
    fnr_min = float(1 - flagged[poisoned].mean())
    # the mean's threshold with the same fraction of clean inputs above it
    thr = float(np.quantile(mean[~poisoned], 1 - fpr))
    med = float(np.median(mean))
    mad = float(np.median(np.abs(mean - med)))
    return {"fpr": fpr, "fnr_min": fnr_min, "fnr_mean": float((mean[poisoned] <= thr).mean()),
            "k_mean": (thr - med) / mad}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*")
    a = p.parse_args(argv)
    took = {r["config"] for r in load_results()["rows"] if r["took"]}
    configs = a.configs or sorted(c.stem for c in SCORES_DIR.glob("*.npz") if c.stem in took)
    for c in configs:
        saved = load_scores(c)
        if not {MEAN, MIN} <= set(saved["scores"]):
            continue
        r = compare(saved["scores"], saved["poisoned"].astype(bool))
        print(f"{c}: {MIN} FPR {r['fpr']:.4f} FNR {r['fnr_min']:.3f}; at that FPR the mean "
              f"has FNR {r['fnr_mean']:.3f} (MAD k = {r['k_mean']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
