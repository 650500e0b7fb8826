"""Experiment: does subtracting the scores of a sample's nearest neighbours in embedding space
cancel the clean target-class false positives? (No: docs/RESULTS.md.)

    python bench/experiments/local_normalization.py RUN_WORKDIR [RUN_WORKDIR ...]

RUN_WORKDIR is a SimCLR configuration's cache directory of ``bench/detection.py`` with its
``last-d16`` trace. A clean truck's neighbours (final checkpoint, backbone features or head
outputs, cosine) are clean trucks that score as high as it does, so ``score − λ · median of
its k neighbours' scores`` should fall for it; whether it stays high for a poison depends on
whether a poison's neighbours are clean (they are not: the poisons share the trigger and
cluster together). λ = -1 adds the neighbours' median instead (smoothing: since the poisons'
neighbours are poisons, it might lift them above the clean trucks; it does not either).
Scores are the default method's (max over 16 draws, mean of 5 instances); poisons larger
than 32×32 are resized to embed them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ffengine.data.index import SampleIndex
from ffengine.detect import flag
from ffengine.engine.backdoor import embed_images
from ffengine.metrics import detection_metrics, roc_auc
from ffengine.run import Run


def embeddings(work: Path, index: SampleIndex) -> dict[str, np.ndarray]:
    run = Run(work / "run")
    model = run.load_model(run.checkpoints[-1]).eval()
    imgs = [a if a.shape[:2] == (32, 32) else
            np.asarray(Image.fromarray(a).resize((32, 32), Image.BILINEAR))
            for a in (index.image(i) for i in range(len(index)))]
    with torch.no_grad():
        return {"backbone": embed_images(model, imgs, head=False).numpy(),
                "head": embed_images(model, imgs, head=True).numpy()}


def main(works: list[Path]) -> None:
    for work in works:
        truth = json.loads((work / "data" / "truth.json").read_text())
        index = SampleIndex(work / "data" / "index")
        poison = np.zeros(len(index), bool)
        poison[truth["poisoned_ids"]] = True
        target = ~poison & (index.labels == truth["attack"]["target_class"])
        terms = np.load(work / "traces" / "v2-last-d16" / "terms.npy")[0]
        base = terms.astype(np.float64).max(axis=0).mean(axis=1)
        print(f"{work.name}: default AUC {roc_auc(base[poison], base[~poison]):.3f}, "
              f"vs clean target {roc_auc(base[poison], base[target]):.3f}")
        for space, emb in embeddings(work, index).items():
            sims = emb @ emb.T
            np.fill_diagonal(sims, -np.inf)
            for k in (10, 50, 200):
                nn = np.argpartition(-sims, k, axis=1)[:, :k]
                local = np.median(base[nn], axis=1)
                for lam in (0.5, 1.0, -1.0):  # -1: the neighbours' median added (smoothing)
                    det = base - lam * local
                    d = detection_metrics(flag(det, 6.0), truth["poisoned_ids"], truth["n"],
                                          scores=det)
                    print(f"  {space:8s} k={k:3d} λ={lam}: AUC {d['ROC_AUC']:.3f}, vs clean "
                          f"target {roc_auc(det[poison], det[target]):.3f}, DACC(k=6) "
                          f"{d['DACC']:.3f}; poisons' neighbours that are poisons "
                          f"{poison[nn[poison]].mean():.2f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main([Path(p) for p in sys.argv[1:]])
