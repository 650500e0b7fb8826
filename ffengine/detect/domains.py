"""Which source domains hold more flagged inputs than chance: the domain-level verdict.

The sample-level MAD rule's false positives (clean images that resemble ``x_r``) spread over
every domain that serves such images, while an attacker's domain serves poisons. So each
domain's flagged count is tested against the flag rate of all *other* domains (leave one
out, so that a large attacker domain does not raise its own baseline): a one-sided binomial
test, Bonferroni-corrected over the domains. A domain is suspicious when its p-value is
below ``alpha / m`` *and* its flag rate is at least ``min_ratio`` times the others' (a huge
domain makes a tiny excess significant; the ratio keeps the verdict about effect size).

Caveat: the test assumes flags are exchangeable across benign domains. A benign domain that
serves mostly the target class (``x_r``'s class) is flagged more often and can be called
suspicious: read the verdict with the domain's content in mind.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom

from ..errors import ConfigError


def domain_suspicion(flagged: np.ndarray, totals: np.ndarray, alpha: float = 0.01,
                     min_ratio: float = 2.0) -> dict[str, np.ndarray]:
    """Per-domain test of the flagged counts ``flagged`` (m,) out of ``totals`` (m,) inputs.

    Returns ``p_value`` (P[X ≥ flagged] for X ~ Binomial(total, p_others), p_others the flag
    rate of the other domains; 1 where the domain is alone, 0 where the others have no flag
    and this one does), ``ratio`` (flag rate / p_others; inf when p_others is 0 and the rate
    is not) and ``suspicious`` (p_value < alpha / m_nonempty and ratio ≥ min_ratio).
    """
    f = np.asarray(flagged, dtype=np.int64)
    n = np.asarray(totals, dtype=np.int64)
    if f.shape != n.shape or f.ndim != 1:
        raise ConfigError(f"flagged and totals must be 1-D of one length; got {f.shape} and "
                          f"{n.shape}.")
    if (f < 0).any() or (f > n).any():
        raise ConfigError("every domain needs 0 ≤ flagged ≤ total.")
    if not 0 < alpha < 1 or min_ratio < 1:
        raise ConfigError(f"alpha must lie in (0, 1) and min_ratio be at least 1; got {alpha} "
                          f"and {min_ratio}.")
    rest_f, rest_n = f.sum() - f, n.sum() - n
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(rest_n > 0, rest_f / np.maximum(rest_n, 1), np.nan)
        rate = np.where(n > 0, f / np.maximum(n, 1), 0.0)
        ratio = np.where(p0 > 0, rate / p0, np.where(rate > 0, np.inf, 1.0))
    p = np.ones(len(f))
    ok = (n > 0) & (rest_n > 0)
    zero_base = ok & (p0 == 0)
    p[zero_base & (f > 0)] = 0.0
    test = ok & (p0 > 0)
    p[test] = binom.sf(f[test] - 1, n[test], p0[test])  # P[X >= f]
    m = max(int((n > 0).sum()), 1)
    suspicious = (p < alpha / m) & (ratio >= min_ratio) & (n > 0)
    return {"p_value": p, "ratio": np.where(n > 0, ratio, np.nan), "suspicious": suspicious}


__all__ = ["domain_suspicion"]
