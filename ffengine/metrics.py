"""Detection quality of a flagged set against the ground-truth poisoned set.

Counts over all ``n`` samples: ``tp`` (poisoned and flagged), ``fp`` (clean, flagged), ``fn``
(poisoned, not flagged), ``tn`` (clean, not flagged).

* ``DACC = (tp + tn) / n``: accuracy of the flagged/not-flagged decision.
* ``FPR = fp / (fp + tn)``, ``FNR = fn / (fn + tp)``; NaN when undefined (no clean / no
  poisoned sample).

With ``scores`` (one per sample, higher = more suspicious), over the non-NaN scores only
(the NaN count is reported as ``n_nan_scores``):

* ``ROC_AUC``: exact Mann-Whitney ``U / (n_pos n_neg)`` from average ranks, i.e. the
  probability that a poisoned score beats a clean one, ties counting one half.
* ``FNR_at_FPR_1pct``: FNR of the rule ``score > t`` where ``t`` is the smallest score that
  keeps the clean false-positive rate at most 1 % (the ``(m+1)``-th largest clean score,
  ``m = floor(0.01 n_neg)``); ``t`` and the FPR actually reached are reported too.
* ``DACC_best_threshold``: the DACC of the best rule ``score > t`` over every ``t`` (an
  oracle, since it reads the truth): how far any threshold on these scores could go, which
  tells a thresholding problem (DACC well below it) from a ranking one (it is low too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from ffengine.errors import ConfigError, DataError

__all__ = ["best_threshold_dacc", "detection_metrics", "fnr_at_fpr", "roc_auc"]


def _check_n(n: int) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n (number of samples) must be an integer >= 1; received {n!r}")
    return int(n)


def _as_ids(ids: Sequence[int] | np.ndarray, n: int, name: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.ndim != 1:
        raise DataError(f"{name} must be a 1-D list of sample ids; received shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise DataError(f"{name} must hold integer sample ids; received dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= n)
    if bad.any():
        raise DataError(
            f"{name} has {int(bad.sum())} id(s) outside [0, {n}), e.g. {int(arr[bad][0])}; "
            "ids must index the n samples"
        )
    uniq, counts = np.unique(arr, return_counts=True)
    if uniq.shape[0] != arr.shape[0]:
        dup = uniq[counts > 1]
        raise DataError(
            f"{name} has {dup.shape[0]} duplicated id(s), e.g. {int(dup[0])}; each sample "
            "may appear once (deduplicate with np.unique)"
        )
    return arr


def _div(a: int, b: int) -> float:
    return a / b if b else float("nan")


def roc_auc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Exact ROC-AUC (Mann-Whitney, ties count 1/2) of non-NaN positive vs. negative scores.

    NaN when either class is empty.
    """
    pos = np.asarray(pos_scores, np.float64).ravel()
    neg = np.asarray(neg_scores, np.float64).ravel()
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    uniq, inverse, counts = np.unique(allv, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value: ties share the mean of their positions.
    # Doubled to stay in exact integers: 2 * avg_rank = 2 * start + count + 1.
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank2 = 2 * starts + counts + 1
    rank2_pos = int(rank2[inverse[:n_pos]].sum())
    u2 = rank2_pos - n_pos * (n_pos + 1)  # 2 * U
    return float(Fraction(u2, 2 * n_pos * n_neg))


def fnr_at_fpr(
    pos_scores: np.ndarray, neg_scores: np.ndarray, target_fpr: float = 0.01
) -> tuple[float, float, float]:
    """``(fnr, threshold, fpr)`` of ``score > threshold`` at the smallest threshold with FPR
    at most ``target_fpr`` on the negatives. NaNs when either class is empty."""
    if not 0.0 <= float(target_fpr) <= 1.0:
        raise ConfigError(f"target_fpr must lie in [0, 1]; received {target_fpr!r}")
    pos = np.asarray(pos_scores, np.float64).ravel()
    neg = np.asarray(neg_scores, np.float64).ravel()
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    nan = float("nan")
    if n_pos == 0 or n_neg == 0:
        return nan, nan, nan
    # Decimal reading of target_fpr (0.29 means 29/100, not the float just below it).
    allowed = math.floor(Fraction(repr(float(target_fpr))) * n_neg)
    if allowed >= n_neg:
        t = -math.inf  # every clean sample may be flagged
        fp = int(np.count_nonzero(neg > t))
    else:
        t = float(np.sort(neg)[n_neg - 1 - allowed])  # the (allowed+1)-th largest clean score
        fp = int(np.count_nonzero(neg > t))
    fn = int(np.count_nonzero(~(pos > t)))
    return fn / n_pos, t, fp / n_neg


def best_threshold_dacc(scores: np.ndarray, is_poison: np.ndarray) -> tuple[float, float]:
    """``(dacc, t)`` of the rule ``score > t`` with the highest DACC over all samples (NaN
    scores are never flagged). ``t`` is ``-inf`` when flagging every scored sample is best."""
    s = np.asarray(scores, np.float64).ravel()
    pos = np.asarray(is_poison, bool).ravel()
    n = s.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    valid = ~np.isnan(s)
    order = np.argsort(-s[valid], kind="stable")
    sv, pv = s[valid][order], pos[valid][order]
    # flagging the top j scored samples: tp_j poisons, j - tp_j clean ones
    tp = np.concatenate([[0], np.cumsum(pv)])
    j = np.arange(sv.shape[0] + 1)
    correct = tp + (int((~pos).sum()) - (j - tp))
    # only cuts between distinct values are thresholds
    ok = np.ones(j.shape[0], bool)
    ok[1:-1] = sv[:-1] > sv[1:]
    best = int(np.flatnonzero(ok)[np.argmax(correct[ok])])
    t = float(sv[best]) if best < sv.shape[0] else -math.inf
    return float(correct[best] / n), t


def detection_metrics(
    flagged_ids: Sequence[int] | np.ndarray,
    truth_ids: Sequence[int] | np.ndarray,
    n: int,
    scores: np.ndarray | None = None,
    *,
    target_fpr: float = 0.01,
) -> dict[str, Any]:
    """Confusion counts, DACC/FPR/FNR and (with ``scores`` of shape ``(n,)``) ROC-AUC and
    FNR at 1 % FPR. See the module docstring for the definitions.

    Raises :class:`~ffengine.errors.DataError` for ids outside ``[0, n)``, duplicated ids or
    a ``scores`` array of the wrong length; :class:`~ffengine.errors.ConfigError` for a bad
    ``n``.
    """
    n = _check_n(n)
    flagged = _as_ids(flagged_ids, n, "flagged_ids")
    truth = _as_ids(truth_ids, n, "truth_ids")
    is_poison = np.zeros(n, bool)
    is_poison[truth] = True
    tp = int(is_poison[flagged].sum())
    fp = flagged.shape[0] - tp
    fn = truth.shape[0] - tp
    tn = n - tp - fp - fn
    out: dict[str, Any] = {
        "n": n,
        "n_poisoned": int(truth.shape[0]),
        "n_flagged": int(flagged.shape[0]),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "DACC": (tp + tn) / n,
        "FPR": _div(fp, fp + tn),
        "FNR": _div(fn, fn + tp),
    }
    if scores is not None:
        s = np.asarray(scores)
        if s.shape != (n,):
            raise DataError(f"scores must have shape ({n},), one per sample; received {s.shape}")
        if s.dtype.kind not in "fiub":
            raise DataError(f"scores must be real numbers; received dtype {s.dtype}")
        s = s.astype(np.float64, copy=False)
        valid = ~np.isnan(s)
        pos, neg = s[valid & is_poison], s[valid & ~is_poison]
        pct = f"{float(target_fpr) * 100:g}pct"
        fnr, thr, fpr = fnr_at_fpr(pos, neg, target_fpr)
        dacc_best, t_best = best_threshold_dacc(s, is_poison)
        out.update({
            "n_nan_scores": int(n - valid.sum()),
            "DACC_best_threshold": dacc_best,
            "threshold_best": t_best,
            "ROC_AUC": roc_auc(pos, neg),
            f"FNR_at_FPR_{pct}": fnr,
            f"threshold_at_FPR_{pct}": thr,
            f"FPR_at_threshold_{pct}": fpr,
        })
    return out
