"""The Otsu refinement of the MAD rule as bench/experiments/threshold_rules.py applies it
(pre-registered in docs/PREREGISTRATION.md, entry 4; the split is ffengine.detect.split)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "experiments"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
rules = pytest.importorskip("threshold_rules")


def test_the_ungated_refinement_keeps_a_flagged_set_it_cannot_split():
    # (the split itself is tested against a brute-force search in tests/test_split.py)
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
    # (a tail that thins out upwards: Otsu's η of an exponential is about 0.65, of a uniform
    # about 0.75, of two separate clusters near 1)
    blob = np.concatenate([clean, (6.5 + rng.exponential(1.0, 400)) * 0.6745])
    assert (rules.RULES["mad-k6-otsu-gated"](blob)
            == rules._mask(len(blob), rules.flag(blob, 6.0))).all()
