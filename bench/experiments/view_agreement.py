"""Experiment (a dead end, kept so it can be re-run): weight each draw by how far apart the
sample's two views are, on a cached harness run.

    OMP_NUM_THREADS=1 python bench/experiments/view_agreement.py RUN_WORKDIR

RUN_WORKDIR is a SimCLR configuration's cache directory of ``bench/detection.py`` with its
``v2-last-d16`` trace (final checkpoint, 16 draws, 5 instances). The hypothesis: a poison's
two views disagree (they fall on different halves of a composite, and the pre-training step
pulls them together), a clean target-class image's views agree, so the step it drives is
small. Each draw's views are re-made with the engine's own augmentation seeds (the same
crops the trace scored) and their head outputs' cosine ``p`` computed. Variants:

* ``weighted``: each draw's term times ``1 - p`` (how hard that step pulls), max / mean
  over draws, mean over instances;
* ``disagreement``: ``-mean(p)`` alone (not backdoor-specific: a composite detector);
* ``fused``: the default score and ``disagreement``, each robustly standardized, summed.

Prints one line per variant and ``k``, with the AUC of poisons against clean target-class
images. Measured results: docs/RESULTS.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ffengine.data.index import SampleIndex
from ffengine.data.loader import iter_chunks
from ffengine.engine.scoring import Engine
from ffengine.metrics import roc_auc
from ffengine.run import Run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from control_pairs import report  # noqa: E402

DRAWS = 16


def view_agreement(run: Run, index: SampleIndex, draws: int) -> np.ndarray:
    """(draws, n) cosine between each sample's two views' head outputs, final checkpoint."""
    engine = Engine(run, checkpoints="last", draws=draws)
    obj, ckpt = engine.objective, engine.checkpoints[0]
    model = obj.load_model(ckpt)
    out = np.zeros((draws, len(index)), dtype=np.float32)
    with torch.no_grad():
        for batch in iter_chunks(index, engine.chunks(len(index))):
            for d in range(draws):
                h = obj.view_features(model, batch.packed, batch.sizes, batch.ids, engine.seed,
                                      ckpt.epoch, d)
                z = F.normalize(model.head(h), dim=1)
                out[d, batch.ids] = (z[: len(batch)] * z[len(batch):]).sum(1).numpy()
    return out


def robust_z(s: np.ndarray) -> np.ndarray:
    med = np.median(s)
    return (s - med) / (1.4826 * np.median(np.abs(s - med)))


def main(work: Path) -> None:
    truth = json.loads((work / "data" / "truth.json").read_text())
    index, run = SampleIndex(work / "data" / "index"), Run(work / "run")
    target = int(truth["attack"]["target_class"])
    terms = np.load(work / "traces" / "v2-last-d16" / "terms.npy")[0]  # (D, n, K)
    cache = work / f"view-agreement-d{DRAWS}.npy"
    if not cache.exists():
        np.save(cache, view_agreement(run, index, DRAWS))
    p = np.load(cache)
    poison = np.zeros(len(index), bool)
    poison[truth["poisoned_ids"]] = True
    clean_target = ~poison & (index.labels == target)
    base = terms.max(0).mean(1)
    weighted = terms * (1 - p)[..., None]
    disagreement = -p.mean(0)
    for name, s in [("default (max16 x5)", base), ("weighted max", weighted.max(0).mean(1)),
                    ("weighted mean", weighted.mean(0).mean(1)),
                    ("disagreement", disagreement),
                    ("fused", robust_z(base) + robust_z(disagreement))]:
        print(f"{name}: AUC vs clean target class {roc_auc(s[poison], s[clean_target]):.3f}")
        report(name, s, truth, index.labels, target)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
