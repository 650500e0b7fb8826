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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detection import METHODS, load_scores, scored_configs  # noqa: E402
from detection_report import matched_fpr  # noqa: E402

MEAN, MIN = "last-max16x5-k6", "last-max16min5-k6"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*")
    a = p.parse_args(argv)
    configs = a.configs or scored_configs()
    for c in configs:
        saved = load_scores(c)
        if not {MEAN, MIN} <= set(saved["scores"]):
            continue
        r = matched_fpr(saved["scores"][MIN], saved["scores"][MEAN],
                        saved["poisoned"].astype(bool), METHODS[MIN].k)
        print(f"{c}: {MIN} FPR {r['fpr']:.4f} FNR {r['fnr']:.3f}; at that FPR the mean "
              f"has FNR {r['fnr_baseline']:.3f} (MAD k = {r['k_baseline']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
