"""The Otsu refinement of the MAD rule in bench/experiments/threshold_rules.py (pre-registered
in docs/PREREGISTRATION.md, entry 4), against a brute-force two-group split."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "experiments"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
rules = pytest.importorskip("threshold_rules")


def _brute_force_otsu(x):
    x = np.sort(x.astype(np.float64))
    best = (-1.0, None)
    for i in range(1, len(x)):
        lo, hi = x[:i], x[i:]
        between = len(lo) * len(hi) / len(x) ** 2 * (lo.mean() - hi.mean()) ** 2
        if between > best[0]:
            best = (between, (x[i - 1] + x[i]) / 2)
    return best[1], best[0] / x.var()


@pytest.mark.parametrize("seed", range(5))
def test_otsu_split_matches_a_brute_force_search(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0, 1, 200 + seed * 37), rng.normal(4, 0.5, 40 + seed)])
    thr, eta = rules.otsu_split(rng.permutation(x))
    ref_thr, ref_eta = _brute_force_otsu(x)
    assert thr == pytest.approx(ref_thr, rel=1e-12) and eta == pytest.approx(ref_eta, rel=1e-9)
    assert 0.0 < eta < 1.0


def test_otsu_split_of_constant_or_tiny_inputs_splits_nothing():
    assert rules.otsu_split(np.full(5, 2.0)) == (2.0, 0.0)
    assert rules.otsu_split(np.array([1.0]))[1] == 0.0
    # so even the ungated refinement keeps a flagged set it cannot split
    x = np.concatenate([np.random.default_rng(1).standard_normal(1000), np.full(20, 50.0)])
    assert (rules.RULES["mad-k6-otsu"](x) == rules._mask(len(x), rules.flag(x, 6.0))).all()
    assert rules.RULES["mad-k6-otsu"](x)[-20:].all()


def test_gated_refinement_keeps_the_mad_flags_unless_the_split_is_clear():
    rng = np.random.default_rng(0)
    clean = rng.standard_normal(5000)
    # a clean tail just above k = 6 and a poison cluster far above it: a clear split
    tail = rng.uniform(6.5, 9.0, 200) * 0.6745  # in MAD units of a standard normal
    poisons = rng.normal(30.0, 1.0, 300) * 0.6745
    x = np.concatenate([clean, tail, poisons])
    mad = rules._mask(len(x), rules.flag(x, 6.0))
    refined = rules.RULES["mad-k6-otsu-gated"](x)
    assert refined.sum() < mad.sum() and not (refined & ~mad).any()
    assert refined[-300:].all() and not refined[5000:5200].any()
    # one blob above the threshold: no clear split, the MAD flags stay
    blob = np.concatenate([clean, rng.uniform(6.5, 9.0, 400) * 0.6745])
    assert (rules.RULES["mad-k6-otsu-gated"](blob)
            == rules._mask(len(blob), rules.flag(blob, 6.0))).all()
