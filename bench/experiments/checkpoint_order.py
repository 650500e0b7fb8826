"""Experiment: which checkpoints carry the signal, per attack?

    python bench/experiments/checkpoint_order.py [CONFIG ...]

Reads the cached all-checkpoint traces of ``bench/detection.py`` (``v2-all-d1-ckpt15``, 15
checkpoints every 5 epochs, where it exists, else ``v2-all-d1``, the 5 at epochs 15..75; one
draw, 5 instances): for each checkpoint alone, cos(f(x_b), f(x_r)) of the first instance and
the AUC of poisons against all clean inputs and against clean target-class ones (the mean of
the instances' terms), then the same for the sum over every checkpoint (Eq. 5) and over the
last and the first third. With no CONFIG, every cached configuration where the attack took.
Reads cached terms only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detection import load_results  # noqa: E402

from ffengine.attacks.poisoned_encoder import load_truth  # noqa: E402
from ffengine.data.index import SampleIndex  # noqa: E402
from ffengine.metrics import roc_auc  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "detection"
TRACES = ("v2-all-d1-ckpt15", "v2-all-d1")


def aucs(s: np.ndarray, poison: np.ndarray, target: np.ndarray) -> str:
    return (f"AUC {roc_auc(s[poison], s[~poison]):.3f}, against clean target "
            f"{roc_auc(s[poison], s[target]):.3f}")


def main(configs: list[str]) -> None:
    took = sorted({r["config"] for r in load_results()["rows"] if r["took"]})
    for config in configs or took:
        work = CACHE / config
        tdir = next((work / "traces" / t for t in TRACES
                     if (work / "traces" / t / "terms.npy").exists()), None)
        if tdir is None:
            continue
        truth = load_truth(work / "data")
        labels = SampleIndex(work / "data" / "index").labels
        poison = np.zeros(truth["n"], bool)
        poison[truth["poisoned_ids"]] = True
        target = ~poison & (labels == truth["attack"]["target_class"])
        summary = json.loads((tdir / "summary.json").read_text())
        terms = np.load(tdir / "terms.npy")[:, 0].astype(np.float64).mean(2)  # (T, n)
        epochs, cos = summary["checkpoints"], summary["cos_per_checkpoint"]

        print(f"{config} ({tdir.name})")
        for t, e in enumerate(epochs):
            print(f"  epoch {e:3d}: cos {cos[t][0]:.3f}  {aucs(terms[t], poison, target)}")
        third = max(1, len(epochs) // 3)
        print(f"  sum of all {len(epochs)}: {aucs(terms.sum(0), poison, target)}")
        print(f"  sum of the last {third}: {aucs(terms[-third:].sum(0), poison, target)}")
        print(f"  sum of the first {third}: {aucs(terms[:third].sum(0), poison, target)}")


if __name__ == "__main__":
    main(sys.argv[1:])
