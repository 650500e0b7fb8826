"""Experiment: do the 16 draws' spread separate poisons from clean target-class images better
than their maximum? (No: docs/RESULTS.md.)

    python bench/experiments/draw_spread.py RUN_WORKDIR [RUN_WORKDIR ...]

RUN_WORKDIR is a SimCLR configuration's cache directory of ``bench/detection.py`` with its
``last-d16`` trace (the final checkpoint, 16 draws, 5 instances). A clean target-class image
should raise cos(x_b, x_r) in every draw (both views show the target class), a PoisonedEncoder
poison only in the draws whose views straddle its two halves; so max − median or max − mean
over draws might rank poisons above clean target-class images. Each statistic is taken per
instance, optionally robustly standardized per instance (median/MAD), and averaged over the
instances; prints the AUC against all clean inputs and against clean target-class ones, and
DACC with MAD k = 6. Reads cached terms only: seconds per configuration.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ffengine.data.index import SampleIndex
from ffengine.detect import flag
from ffengine.metrics import detection_metrics, roc_auc


def statistics(per_draw: np.ndarray) -> dict[str, np.ndarray]:
    """(D, n, K) per-draw terms -> {name: (n, K)}."""
    top, med, mean = per_draw.max(0), np.median(per_draw, 0), per_draw.mean(0)
    return {"max": top, "mean": mean, "median": med, "top2-mean": np.sort(per_draw, 0)[-2:]
            .mean(0), "max-median": top - med, "max-mean": top - mean,
            "max-half-median": top - 0.5 * med}


def robust_z(x: np.ndarray) -> np.ndarray:
    med = np.median(x, axis=0)
    return (x - med) / (np.median(np.abs(x - med), axis=0) + 1e-12)


def main(works: list[Path]) -> None:
    for work in works:
        truth = json.loads((work / "data" / "truth.json").read_text())
        labels = SampleIndex(work / "data" / "index").labels
        poison = np.zeros(truth["n"], bool)
        poison[truth["poisoned_ids"]] = True
        target = ~poison & (labels == truth["attack"]["target_class"])
        terms = np.load(work / "traces" / "v2-last-d16" / "terms.npy")
        print(work.name)
        for name, stat in statistics(terms[0].astype(np.float64)).items():
            for norm, s in (("raw", stat), ("robust-z", robust_z(stat))):
                det = s.mean(axis=1)
                d = detection_metrics(flag(det, 6.0), truth["poisoned_ids"], truth["n"],
                                      scores=det)
                print(f"  {name:16s} {norm:9s} AUC {d['ROC_AUC']:.3f}  vs clean target "
                      f"{roc_auc(det[poison], det[target]):.3f}  DACC(k=6) {d['DACC']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main([Path(p) for p in sys.argv[1:]])
