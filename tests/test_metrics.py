"""Detection metrics: confusion counts, exact ROC-AUC, FNR at 1 % FPR."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ffengine.errors import ConfigError, DataError
from ffengine.metrics import best_threshold_dacc, detection_metrics, fnr_at_fpr, roc_auc


@pytest.fixture
def np_rng() -> np.random.Generator:
    """Seeded numpy generator (conftest's ``rng`` is a torch generator)."""
    return np.random.default_rng(20240612)


def _auc_bruteforce(pos: np.ndarray, neg: np.ndarray) -> float:
    wins = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return (wins + 0.5 * ties) / (pos.size * neg.size)


def _fnr_at_fpr_bruteforce(pos, neg, target):
    # Smallest candidate threshold (any observed score, or -inf) with FPR <= target.
    for t in np.concatenate([[-np.inf], np.unique(np.concatenate([pos, neg]))]):
        fpr = np.mean(neg > t)
        if fpr <= target + 1e-12:
            return np.mean(~(pos > t)), t, fpr
    raise AssertionError("unreachable: the largest score gives FPR 0")


def test_confusion_counts_and_rates():
    m = detection_metrics(flagged_ids=[0, 1, 2, 7], truth_ids=[1, 2, 3], n=10)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 2, 1, 5)
    assert m["n"] == 10 and m["n_poisoned"] == 3 and m["n_flagged"] == 4
    assert m["DACC"] == pytest.approx(0.7)
    assert m["FPR"] == pytest.approx(2 / 7)
    assert m["FNR"] == pytest.approx(1 / 3)
    assert "ROC_AUC" not in m


def test_undefined_rates_are_nan():
    m = detection_metrics([], [], n=5)
    assert m["DACC"] == 1.0 and m["FPR"] == 0.0 and math.isnan(m["FNR"])
    m = detection_metrics([0, 1], [0, 1], n=2)
    assert math.isnan(m["FPR"]) and m["FNR"] == 0.0


@settings(max_examples=150, deadline=None)
@given(
    n_pos=st.integers(0, 40), n_neg=st.integers(0, 40), levels=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_auc_matches_pairwise_count_with_ties(n_pos, n_neg, levels, seed):
    r = np.random.default_rng(seed)
    pos = r.integers(0, levels, n_pos).astype(np.float64)  # few levels: many ties
    neg = r.integers(0, levels, n_neg).astype(np.float64)
    neg[neg == 0] = -0.0  # -0.0 ties with +0.0
    got = roc_auc(pos, neg)
    if n_pos == 0 or n_neg == 0:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(_auc_bruteforce(pos, neg), abs=1e-15)


@settings(max_examples=150, deadline=None)
@given(
    n_pos=st.integers(1, 30), n_neg=st.integers(1, 400), levels=st.integers(2, 50),
    target=st.sampled_from([0.0, 0.01, 0.05, 0.29, 1.0]), seed=st.integers(0, 2**32 - 1),
)
def test_fnr_at_fpr_matches_bruteforce(n_pos, n_neg, levels, target, seed):
    r = np.random.default_rng(seed)
    pos = r.integers(0, levels, n_pos).astype(np.float64) + 1
    neg = r.integers(0, levels, n_neg).astype(np.float64)
    fnr, t, fpr = fnr_at_fpr(pos, neg, target)
    ref_fnr, ref_t, ref_fpr = _fnr_at_fpr_bruteforce(pos, neg, target)
    assert (fnr, fpr) == pytest.approx((ref_fnr, ref_fpr))
    assert t == ref_t
    assert fpr <= target


@settings(max_examples=150, deadline=None)
@given(
    n_pos=st.integers(0, 30), n_neg=st.integers(0, 200), levels=st.integers(1, 20),
    n_nan=st.integers(0, 3), seed=st.integers(0, 2**32 - 1),
)
def test_best_threshold_dacc_matches_every_threshold_tried(n_pos, n_neg, levels, n_nan, seed):
    """The oracle DACC is the best over every observed score and -inf as ``t``, with ties
    (few levels) and NaN scores, which are never flagged."""
    r = np.random.default_rng(seed)
    s = r.integers(0, levels, n_pos + n_neg).astype(np.float64)
    is_p = np.zeros(s.shape[0], bool)
    is_p[:n_pos] = True
    s[r.permutation(s.shape[0])[:n_nan]] = np.nan
    if s.shape[0] == 0:
        assert math.isnan(best_threshold_dacc(s, is_p)[0])
        return
    got, t = best_threshold_dacc(s, is_p)

    def dacc(t):
        flagged = ~np.isnan(s) & (s > t)
        return np.mean(flagged == is_p)
    ref = max(dacc(t) for t in np.concatenate([[-np.inf], s[~np.isnan(s)]]))
    assert got == pytest.approx(ref, abs=1e-12)
    assert dacc(t) == pytest.approx(got, abs=1e-12)


def test_scores_auc_fnr_and_nan_scores(np_rng):
    n = 1000
    truth = np_rng.choice(n, 50, replace=False)
    scores = np_rng.standard_normal(n)
    scores[truth] += 3.0
    scores[[int(truth[0]), 5 if 5 not in truth else 6]] = np.nan
    flagged = np.flatnonzero(scores > 2.0)
    m = detection_metrics(flagged, truth, n, scores=scores)
    valid = ~np.isnan(scores)
    is_p = np.zeros(n, bool)
    is_p[truth] = True
    assert m["n_nan_scores"] == 2
    assert m["ROC_AUC"] == pytest.approx(
        _auc_bruteforce(scores[valid & is_p], scores[valid & ~is_p]))
    ref = _fnr_at_fpr_bruteforce(scores[valid & is_p], scores[valid & ~is_p], 0.01)
    assert m["FNR_at_FPR_1pct"] == pytest.approx(ref[0])
    assert m["threshold_at_FPR_1pct"] == ref[1]
    assert m["FPR_at_threshold_1pct"] <= 0.01
    assert 0.9 < m["ROC_AUC"] <= 1.0
    assert m["DACC"] <= m["DACC_best_threshold"] == best_threshold_dacc(scores, is_p)[0]


def test_perfect_and_inverted_scores():
    scores = np.arange(10.0)
    m = detection_metrics([8, 9], [8, 9], 10, scores=scores)
    assert m["ROC_AUC"] == 1.0 and m["FNR_at_FPR_1pct"] == 0.0 and m["DACC"] == 1.0
    m = detection_metrics([], [0, 1], 10, scores=scores)
    assert m["ROC_AUC"] == 0.0 and m["FNR_at_FPR_1pct"] == 1.0


def test_clear_errors():
    with pytest.raises(DataError, match=r"outside \[0, 5\)"):
        detection_metrics([5], [0], 5)
    with pytest.raises(DataError, match="outside"):
        detection_metrics([0], [-1], 5)
    with pytest.raises(DataError, match="duplicated"):
        detection_metrics([1, 1], [0], 5)
    with pytest.raises(DataError, match="duplicated"):
        detection_metrics([1], [2, 2], 5)
    with pytest.raises(DataError, match="integer"):
        detection_metrics([1.5], [0], 5)
    with pytest.raises(DataError, match="shape"):
        detection_metrics([1], [0], 5, scores=np.zeros(4))
    with pytest.raises(ConfigError, match="n "):
        detection_metrics([], [], 0)
    with pytest.raises(ConfigError, match="target_fpr"):
        fnr_at_fpr([1.0], [0.0], 1.5)
