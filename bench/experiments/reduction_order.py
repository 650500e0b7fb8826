"""Experiment: does the order of the two reductions matter? (No: docs/RESULTS.md.)

    python bench/experiments/reduction_order.py CONFIG [CONFIG ...]

CONFIG names a SimCLR configuration cached by ``bench/detection.py`` with its ``last-d16``
trace (the final checkpoint, 16 draws, 5 instances). The default takes each instance's
maximum over draws, then the instances' mean. A poison's straddling draw raises every
instance's cosine in the same draw (the instances share the draws' crops), so reducing over
instances first, per draw, then taking the maximum might keep the poisons' peaks and
average away the clean target-class images' instance-specific ones. Prints, per statistic,
the AUC against all clean inputs and against clean target-class ones, the FNR at 1% and 5%
FPR, DACC with MAD k = 6 and the best threshold's DACC. Reads cached terms only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ffengine.data.index import SampleIndex
from ffengine.detect import flag
from ffengine.metrics import detection_metrics, roc_auc

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "detection"


def statistics(terms: np.ndarray) -> dict[str, np.ndarray]:
    """(D, n, K) per-draw, per-instance terms -> {name: (n,) detection score}."""
    t = terms.astype(np.float64)
    med = np.median(t, axis=(0, 1), keepdims=True)
    z = (t - med) / np.median(np.abs(t - med), axis=(0, 1), keepdims=True)
    return {"mean of max (default)": t.max(0).mean(1),
            "max of mean": t.mean(2).max(0),
            "max of median": np.median(t, 2).max(0),
            "max of min": t.min(2).max(0),
            "top-2 mean of mean": np.sort(t.mean(2), 0)[-2:].mean(0),
            "max of mean, z per instance": z.mean(2).max(0),
            "mean of max, z per instance": z.max(0).mean(1)}


def fnr_at_fpr(det: np.ndarray, poison: np.ndarray, fpr: float) -> float:
    thr = np.quantile(det[~poison], 1 - fpr)
    return float((det[poison] <= thr).mean())


def main(configs: list[str]) -> None:
    for config in configs:
        work = CACHE / config
        truth = json.loads((work / "data" / "truth.json").read_text())
        labels = SampleIndex(work / "data" / "index").labels
        poison = np.zeros(truth["n"], bool)
        poison[truth["poisoned_ids"]] = True
        target = ~poison & (labels == truth["attack"]["target_class"])
        terms = np.load(work / "traces" / "v2-last-d16" / "terms.npy")[0]
        print(config)
        for name, det in statistics(terms).items():
            d = detection_metrics(flag(det, 6.0), truth["poisoned_ids"], truth["n"], scores=det)
            print(f"  {name:28s} AUC {d['ROC_AUC']:.3f}  vs clean target "
                  f"{roc_auc(det[poison], det[target]):.3f}  FNR at FPR 1% "
                  f"{fnr_at_fpr(det, poison, 0.01):.3f}, 5% {fnr_at_fpr(det, poison, 0.05):.3f}"
                  f"  DACC(k=6) {d['DACC']:.3f}  best DACC {d['DACC_best_threshold']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
