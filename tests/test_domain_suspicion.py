"""The domain-level verdict: a leave-one-out binomial test per domain, Bonferroni-corrected."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from ffengine.detect.domains import domain_suspicion
from ffengine.errors import ConfigError
from ffengine.report import domain_table, format_domain_table


def _tail_exact(k: int, n: int, p: Fraction) -> float:
    """P[X >= k], X ~ Binomial(n, p), summed in exact rational arithmetic."""
    return float(sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1)))


def test_p_values_match_exact_binomial_tails(np_rng):
    for _ in range(20):
        m = int(np_rng.integers(2, 7))
        totals = np_rng.integers(1, 60, m)
        flagged = np.array([np_rng.integers(0, t + 1) for t in totals])
        out = domain_suspicion(flagged, totals)
        for d in range(m):
            rest_f, rest_n = int(flagged.sum() - flagged[d]), int(totals.sum() - totals[d])
            p0 = Fraction(rest_f, rest_n)
            if p0 == 0:
                want = 0.0 if flagged[d] > 0 else 1.0
            else:
                want = _tail_exact(int(flagged[d]), int(totals[d]), p0)
            assert out["p_value"][d] == pytest.approx(want, rel=1e-9, abs=1e-300)
            rate = flagged[d] / totals[d]
            if p0 > 0:
                assert out["ratio"][d] == pytest.approx(rate / float(p0), rel=1e-12)


def test_attacker_domain_found_and_benign_ones_not(np_rng):
    # 8 benign domains flagged at 7% (the false positives), one attacker domain at 70%
    totals = np.array([600] * 8 + [250])
    flagged = np.array([np_rng.binomial(600, 0.07) for _ in range(8)] + [175])
    out = domain_suspicion(flagged, totals)
    assert out["suspicious"].tolist() == [False] * 8 + [True]
    assert out["p_value"][-1] < 1e-50


def test_no_false_alarm_when_flags_are_uniform():
    # under the null (every domain flagged at the same rate) the Bonferroni-corrected test
    # raises an alarm in at most ~alpha of the draws: over 200 seeded draws, at most a few
    alarms = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        totals = rng.integers(100, 2000, 12)
        flagged = rng.binomial(totals, 0.08)
        alarms += bool(domain_suspicion(flagged, totals, min_ratio=1.0)["suspicious"].any())
    assert alarms <= 6  # expected ≤ 2 at alpha = 0.01


def test_min_ratio_keeps_a_small_excess_in_a_huge_domain_benign():
    totals = np.array([1_000_000, 1000, 1000, 1000])
    flagged = np.array([90_000, 80, 80, 80])  # 9% against 8%: significant, not 2x
    out = domain_suspicion(flagged, totals)
    assert out["p_value"][0] < 1e-3 and not out["suspicious"][0]
    assert domain_suspicion(flagged, totals, min_ratio=1.0)["suspicious"][0]


def test_edge_cases_and_errors():
    out = domain_suspicion(np.array([3, 0]), np.array([10, 10]))  # the others have no flag
    assert out["p_value"][0] == 0.0 and np.isinf(out["ratio"][0]) and out["suspicious"][0]
    assert out["p_value"][1] == 1.0 and not out["suspicious"][1]
    alone = domain_suspicion(np.array([5]), np.array([10]))
    assert alone["p_value"][0] == 1.0 and not alone["suspicious"][0]
    empty = domain_suspicion(np.array([0, 2]), np.array([0, 10]))
    assert not empty["suspicious"].any() and np.isnan(empty["ratio"][0])
    with pytest.raises(ConfigError):
        domain_suspicion(np.array([3]), np.array([2]))
    with pytest.raises(ConfigError):
        domain_suspicion(np.array([1, 2]), np.array([3]))
    with pytest.raises(ConfigError):
        domain_suspicion(np.array([1]), np.array([3]), alpha=0.0)


def test_domain_table_carries_the_verdict_and_orders_by_it():
    names = ["big.example", "attacker.example", "small.example"]
    # big: 60/1000 (most flags, by size), attacker: 40/50, small: 1/50
    domain_ids = np.array([0] * 1000 + [1] * 50 + [2] * 50)
    flagged = np.r_[np.arange(60), 1000 + np.arange(40), [1050]]
    rows = domain_table(flagged, domain_ids, names)
    # big has the most flags but the lowest rate: last
    assert [r["domain"] for r in rows] == ["attacker.example", "small.example", "big.example"]
    assert [r["suspicious"] for r in rows] == [True, False, False]
    text = format_domain_table(rows)
    assert text.splitlines()[2].split()[-1] == "SUSPICIOUS"


def test_domain_table_rows_are_strict_json_when_no_other_domain_has_a_flag():
    rows = domain_table([0, 1], [0, 0, 1, 1], ["hot.example", "cold.example"])
    assert rows[0]["domain"] == "hot.example" and rows[0]["ratio"] is None
    json.dumps(rows, allow_nan=False)  # no Infinity / NaN
    assert format_domain_table(rows).splitlines()[2].split()[4] == "inf"
