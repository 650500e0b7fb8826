"""Experiment: does an earlier checkpoint, scored with many draws, separate poisons from clean
target-class images better than the final one? (No: docs/RESULTS.md.)

    OMP_NUM_THREADS=1 python bench/experiments/mid_checkpoint.py RUN_WORKDIR 30,45,60

RUN_WORKDIR is a SimCLR configuration's cache directory of ``bench/detection.py``. Before
the backdoor has fully formed, ``x_b`` is not yet inside the target cluster, so training on
clean target-class images should raise cos(x_b, x_r) less there, while a poison's straddling
draw already pulls the trigger towards the target. Each listed checkpoint is scored alone
with 16 draws and the harness's 5 instances; prints the AUC of max and mean over draws
against all clean inputs, clean target-class ones and the rest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ffengine.data.index import SampleIndex
from ffengine.engine.instance import load_instance
from ffengine.engine.scoring import Engine
from ffengine.metrics import roc_auc
from ffengine.run import Run

DRAWS = 16


def main(work: Path, epochs: list[int]) -> None:
    truth = json.loads((work / "data" / "truth.json").read_text())
    index, run = SampleIndex(work / "data" / "index"), Run(work / "run")
    insts = [load_instance(p) for p in sorted((work / "instances").glob("[0-9][0-9]"))]
    poison = np.zeros(len(index), bool)
    poison[truth["poisoned_ids"]] = True
    target = ~poison & (index.labels == truth["attack"]["target_class"])
    other = ~poison & ~target
    for epoch in epochs:
        cache = work / f"mid-checkpoint-d{DRAWS}-e{epoch}.npy"
        if not cache.exists():
            res = Engine(run, checkpoints=[epoch], draws=DRAWS, progress=False).score(index,
                                                                                      insts)
            np.save(cache, np.asarray(res.terms)[0])  # (D, n, K)
        terms = np.load(cache)
        for how, s in (("max", terms.max(0).mean(1)), ("mean", terms.mean(0).mean(1))):
            print(f"epoch {epoch} {how}: AUC {roc_auc(s[poison], s[~poison]):.3f}, against "
                  f"clean target class {roc_auc(s[poison], s[target]):.3f}, against the rest "
                  f"{roc_auc(s[poison], s[other]):.3f}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(e) for e in sys.argv[2].split(",")])
