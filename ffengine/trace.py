"""``trace``: score every pre-training input, flag the MAD outliers, aggregate by domain.

A result directory holds::

    metadata.json          run, index and options the results belong to
    scores.npy             (n, K) float32: s_ik per sample and instance (NaN: skipped)
    terms.npy              (T, D, n, K) float32: per-checkpoint, per-draw terms
    detection_scores.npy   (n,) float32: the score the MAD rule reads (mean over instances)
    flagged.npy            int64 ids above median + k·MAD
    domains.json / .txt    flagged / total per source domain, most suspicious first
    scores.png             score distribution with the threshold
    summary.json           counts, threshold, backend, skipped samples

Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data.index import SampleIndex
from .detect import robust_stats
from .engine.instance import Instance
from .engine.scoring import Engine
from .errors import ConfigError, DataError
from .io_utils import atomic_save_npy, atomic_write_bytes, atomic_write_json
from .report import domain_table, format_domain_table, plot_score_distribution


def trace(engine: Engine, index: SampleIndex, instances: Sequence[Instance], out: str | Path,
          k: float = 3.0, instance_paths: Sequence[str] | None = None) -> dict:
    """Run the whole traceback into ``out`` and return the summary."""
    if k < 0:
        raise ConfigError(f"k must be non-negative, got {k}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = engine.score(index, instances)
    det = result.detection_scores.astype(np.float32)
    stats = robust_stats(det)
    thr = float(stats.threshold(k))
    flagged = np.flatnonzero(det > thr).astype(np.int64)  # NaN compares False: never flagged
    rows = domain_table(flagged, index.domains, index.domain_names)

    atomic_save_npy(out / "scores.npy", result.scores)
    atomic_save_npy(out / "terms.npy", result.terms)
    atomic_save_npy(out / "detection_scores.npy", det)
    atomic_save_npy(out / "flagged.npy", flagged)
    atomic_write_json(out / "domains.json", rows)
    atomic_write_bytes(out / "domains.txt", format_domain_table(rows).encode())
    plot_score_distribution(det, thr, out / "scores.png",
                            title=f"maliciousness scores (n={len(det)}, k={k:g})")
    summary = {
        "n": len(index),
        "n_scored": int(stats.n),
        "n_flagged": int(len(flagged)),
        "k": k,
        "median": float(stats.median),
        "mad": float(stats.mad),
        "threshold": thr,
        "backend": result.backend,
        "checkpoints": [c.epoch for c in result.checkpoints],
        "cos_per_checkpoint": result.cos.tolist(),
        "draws": engine.draws,
        "aggregate": engine.aggregate,
        "skipped": [{"id": i, "key": index.key(i), "reason": r} for i, r in result.skipped],
        "top_domains": rows[:5],
    }
    meta = {
        "ffengine": __version__,
        "run": str(engine.run.path),
        "index": str(index.path),
        "index_hash": index.hash,
        "instances": list(instance_paths or []),
        "options": {"k": k, "checkpoints": [c.epoch for c in result.checkpoints],
                    "draws": engine.draws, "aggregate": engine.aggregate,
                    "batch_size": engine.batch_size, "seed": engine.seed,
                    "backend": result.backend},
    }
    atomic_write_json(out / "metadata.json", meta)
    atomic_write_json(out / "summary.json", summary)
    return summary


def load_results(path: str | Path) -> dict:
    """The arrays and summary of a result directory."""
    path = Path(path)
    try:
        import json

        return {
            "summary": json.loads((path / "summary.json").read_text()),
            "detection_scores": np.load(path / "detection_scores.npy", mmap_mode="r"),
            "flagged": np.load(path / "flagged.npy"),
        }
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a complete trace result ({e}); run `ffengine trace` "
                        "into it first.") from e


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
