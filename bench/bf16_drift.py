"""How much bf16 autocast on the backbone moves the scores and the flagged set.

    python bench/bf16_drift.py --run RUN --index INDEX --instance DIR [DIR ...] --json

Scores the index twice with the same views and batches (``Engine(precision=...)``,
float32 and bfloat16) and reports the relative score change, the rank correlation, the
flagged sets' overlap under the MAD rule and, with ``--truth``, both AUCs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from ffengine.attacks.poisoned_encoder import load_truth
    from ffengine.data.index import SampleIndex
    from ffengine.detect import flag
    from ffengine.engine.instance import load_instance
    from ffengine.engine.scoring import Engine
    from ffengine.metrics import detection_metrics

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--instance", nargs="+", required=True)
    p.add_argument("--truth")
    p.add_argument("--checkpoints", default="last")
    p.add_argument("--k", type=float, default=3.0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    index = SampleIndex(a.index)
    insts = [load_instance(d) for d in a.instance]
    out: dict = {"n": len(index), "instances": len(insts), "checkpoints": a.checkpoints}
    det = {}
    for prec in ("float32", "bfloat16"):
        t0 = time.perf_counter()
        res = Engine(a.run, checkpoints=a.checkpoints, precision=prec).score(index, insts)
        out[f"{prec}_s"] = round(time.perf_counter() - t0, 1)
        det[prec] = res.detection_scores
    f, b = det["float32"].astype(np.float64), det["bfloat16"].astype(np.float64)
    rel = np.abs(b - f) / np.maximum(np.abs(f), 1e-12)
    scale = np.abs(f).max()
    ranks = [np.argsort(np.argsort(x)) for x in (f, b)]
    flag_f, flag_b = set(flag(det["float32"], a.k).tolist()), set(flag(det["bfloat16"],
                                                                      a.k).tolist())
    out.update({
        "abs_diff_max_over_max_score": float(np.abs(b - f).max() / scale),
        "rel_diff_median": float(np.median(rel)), "rel_diff_p99": float(np.quantile(rel, .99)),
        "spearman": float(np.corrcoef(*ranks)[0, 1]),
        "flagged_float32": len(flag_f), "flagged_bfloat16": len(flag_b),
        "flagged_jaccard": len(flag_f & flag_b) / max(1, len(flag_f | flag_b)),
    })
    if a.truth:
        truth = load_truth(a.truth)
        for prec, d in det.items():
            m = detection_metrics(sorted(flag(d, a.k).tolist()), truth["poisoned_ids"],
                                  truth["n"], scores=d)
            out[f"auc_{prec}"] = m["ROC_AUC"]
    print(json.dumps(out, sort_keys=True) if a.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
