"""``ffengine eval``: detection quality of a trace against the attack's ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .attacks.poisoned_encoder import load_truth
from .errors import DataError
from .metrics import detection_metrics
from .trace import load_results


def evaluate(truth_path: str | Path, results_path: str | Path) -> dict:
    """DACC, FPR, FNR, ROC-AUC and FNR at 1% FPR of a trace result, and the DACC of the best
    threshold on its scores (an oracle: how far any threshold rule could go)."""
    truth = load_truth(truth_path)
    res = load_results(results_path)
    scores = np.asarray(res["detection_scores"], dtype=np.float64)
    if len(scores) != truth["n"]:
        raise DataError(f"the trace at {results_path} scored {len(scores)} samples but the "
                        f"ground truth describes {truth['n']}; evaluate a trace of the same "
                        "index.")
    m = detection_metrics(res["flagged"], truth["poisoned_ids"], truth["n"], scores=scores)
    return {"dacc": m["DACC"], "fpr": m["FPR"], "fnr": m["FNR"], "auc": m["ROC_AUC"],
            "fnr_at_fpr_1pct": m["FNR_at_FPR_1pct"], "dacc_best_threshold":
            m["DACC_best_threshold"], "n": m["n"],
            "n_poisoned": m["n_poisoned"], "n_flagged": m["n_flagged"], "tp": m["tp"],
            "fp": m["fp"]}


def format_metrics(m: dict) -> str:
    return (f"DACC {m['dacc']:.4f}  FPR {m['fpr']:.4f}  FNR {m['fnr']:.4f}  AUC {m['auc']:.4f}"
            f"  (FNR at 1% FPR {m['fnr_at_fpr_1pct']:.4f}; best threshold's DACC "
            f"{m['dacc_best_threshold']:.4f}; n={m['n']}, poisoned "
            f"{m['n_poisoned']}, flagged {m['n_flagged']})")
