"""The domain-level verdict: a leave-one-out Fisher exact test per domain, Bonferroni-corrected,
stepped down (the domains called leave the baseline)."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from ffengine.detect.domains import domain_suspicion
from ffengine.errors import ConfigError
from ffengine.report import domain_table, format_domain_table


def _fisher_tail(k: int, n: int, k_base: int, n_base: int) -> float:
    """P[X >= k], X ~ Hypergeometric(n + n_base, k + k_base, n), in exact integer arithmetic."""
    total = math.comb(n + n_base, n)
    return float(Fraction(sum(math.comb(k + k_base, j) * math.comb(n + n_base - k - k_base, n - j)
                              for j in range(k, n + 1)), total))


def _step_down(flagged, totals, alpha=0.01, min_ratio=2.0):
    """The verdict written out: pass after pass, each domain against the pooled flags of the
    other domains not yet called, until no new domain is called."""
    m = max(int((totals > 0).sum()), 1)
    called: set[int] = set()
    while True:
        p, ratio = [], []
        for d in range(len(flagged)):
            base = [j for j in range(len(flagged)) if j != d and j not in called]
            kb, nb = sum(int(flagged[j]) for j in base), sum(int(totals[j]) for j in base)
            if totals[d] == 0 or nb == 0:
                p.append(1.0)
                ratio.append(None)
                continue
            p.append(_fisher_tail(int(flagged[d]), int(totals[d]), kb, nb))
            rate, rate_b = Fraction(int(flagged[d]), int(totals[d])), Fraction(kb, nb)
            ratio.append(rate / rate_b if rate_b else (math.inf if rate else 1.0))
        new = {d for d in range(len(flagged)) if totals[d] > 0 and p[d] < alpha / m
               and ratio[d] is not None and ratio[d] >= min_ratio}
        if new <= called:
            return p, ratio, called
        called |= new


def test_p_values_and_verdict_match_the_step_down_written_out(np_rng):
    for trial in range(40):
        m = int(np_rng.integers(2, 7))
        totals = np_rng.integers(1, 60, m)
        flagged = np.array([np_rng.integers(0, t + 1) for t in totals])
        if trial % 2:  # half the draws with one or two clearly attacked domains
            for d in np_rng.choice(m, size=min(2, m - 1), replace=False):
                totals[d] = 200
                flagged[d] = int(np_rng.integers(120, 200))
        out = domain_suspicion(flagged, totals)
        p, ratio, called = _step_down(flagged, totals)
        assert set(np.flatnonzero(out["suspicious"]).tolist()) == called
        np.testing.assert_allclose(out["p_value"], p, rtol=1e-9, atol=1e-300)
        for d in range(m):
            if ratio[d] is not None and ratio[d] != math.inf:
                assert out["ratio"][d] == pytest.approx(float(ratio[d]), rel=1e-12)


def test_step_down_finds_poisons_spread_over_several_shared_domains():
    # 5 clean domains flagged at 5%; 3 domains that also host poisons among clean images,
    # one of them more than the others. A host's leave-one-out baseline holds the other
    # hosts: the first pass calls only the largest; without it in the baseline, the next
    # stands out, then the last.
    totals = np.array([600] * 5 + [767] * 3)
    flagged = np.array([30] * 5 + [200, 140, 140])
    out = domain_suspicion(flagged, totals, min_ratio=2.0)
    assert out["suspicious"].tolist() == [False] * 5 + [True] * 3
    # the first pass alone: 140/767 = 18% against (200 + 140 + 150) / 4534 = 11%, < 2x;
    # 200/767 = 26% against (280 + 150) / 4534 = 9.5%, > 2x
    assert 140 / 767 < 2 * (200 + 140 + 150) / 4534 and 200 / 767 > 2 * (280 + 150) / 4534
    assert _step_down(flagged, totals)[2] == {5, 6, 7}


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
    totals = np.array([1_000_000, 100_000, 100_000, 100_000])
    flagged = np.array([90_000, 8000, 8000, 8000])  # 9% against 8%: significant, not 2x
    out = domain_suspicion(flagged, totals)
    assert out["p_value"][0] < 1e-3 and not out["suspicious"][0]
    assert domain_suspicion(flagged, totals, min_ratio=1.0)["suspicious"][0]


def test_edge_cases_and_errors():
    out = domain_suspicion(np.array([30, 0]), np.array([100, 100]))  # the other has no flag
    assert out["p_value"][0] < 1e-9 and np.isinf(out["ratio"][0]) and out["suspicious"][0]
    assert out["p_value"][1] == 1.0 and not out["suspicious"][1]  # alone in its baseline
    # 3 of 10 against 0 of 10 is weak evidence once the baseline's rate counts as estimated
    weak = domain_suspicion(np.array([3, 0]), np.array([10, 10]))
    assert weak["p_value"][0] == pytest.approx(120 / 1140) and not weak["suspicious"][0]
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
    # big: 60/1000 (most flags, by size), attacker: 40/50, small: 4/50
    domain_ids = np.array([0] * 1000 + [1] * 50 + [2] * 50)
    flagged = np.r_[np.arange(60), 1000 + np.arange(40), 1050 + np.arange(4)]
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
