"""Which source domains hold more flagged inputs than chance: the domain-level verdict.

The sample-level MAD rule's false positives (clean images that resemble ``x_r``) spread over
every domain that serves such images, while an attacker's domain serves poisons. So each
domain's flagged count is tested against the flags of the *other* domains (leave one out, so
that a large attacker domain does not raise its own baseline): a one-sided Fisher exact test
(the hypergeometric tail, which counts the baseline's rate as estimated, not known: that
matters once the step-down below leaves few domains in it), Bonferroni-corrected over the
domains. A domain is suspicious when its p-value is below
``alpha / m`` *and* its flag rate is at least ``min_ratio`` times the others' (a huge domain
makes a tiny excess significant; the ratio keeps the verdict about effect size).

Step-down: the domains called suspicious leave the baseline and the others are tested again,
until no new domain is called. Poisons hosted on several domains among clean images would
otherwise raise each other's baseline (with the leave-one-out rate alone, poisons spread over
3 of 8 benign CIFAR domains were found on about 1 of the 3:
``bench/experiments/domain_spread.py``). Where no domain is called in the first pass (the
global null) the procedure stops there, so its false-alarm rate is the Bonferroni test's.

Caveat: the test assumes flags are exchangeable across benign domains. A benign domain that
serves mostly the target class (``x_r``'s class) is flagged more often and can be called
suspicious: read the verdict with the domain's content in mind.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import hypergeom

from ..errors import ConfigError


def domain_suspicion(flagged: np.ndarray, totals: np.ndarray, alpha: float = 0.01,
                     min_ratio: float = 2.0) -> dict[str, np.ndarray]:
    """Per-domain test of the flagged counts ``flagged`` (m,) out of ``totals`` (m,) inputs.

    Returns ``suspicious`` (called in any pass of the step-down: p_value < alpha / m_nonempty
    and ratio ≥ min_ratio against the baseline of that pass), and, against the final
    baseline (the other domains not called suspicious, with flag rate p_base), ``p_value``
    (one-sided Fisher exact: P[X ≥ flagged] for X ~ Hypergeometric(total + n_base,
    flagged + f_base, total); 1 where no other domain is left) and ``ratio`` (flag rate /
    p_base; inf when p_base is 0 and the rate is not).
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
    m = max(int((n > 0).sum()), 1)
    suspicious = np.zeros(len(f), dtype=bool)
    while True:  # at most m passes: each adds a domain or stops
        p, ratio = _against_baseline(f, n, ~suspicious)
        called = suspicious | ((p < alpha / m) & (ratio >= min_ratio) & (n > 0))
        if (called == suspicious).all():
            break
        suspicious = called
    return {"p_value": p, "ratio": np.where(n > 0, ratio, np.nan), "suspicious": suspicious}


def _against_baseline(f: np.ndarray, n: np.ndarray,
                      base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each domain's one-sided Fisher exact p-value and rate ratio against the pooled flags
    of the ``base`` domains other than itself."""
    rest_f = f[base].sum() - np.where(base, f, 0)
    rest_n = n[base].sum() - np.where(base, n, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(rest_n > 0, rest_f / np.maximum(rest_n, 1), np.nan)
        rate = np.where(n > 0, f / np.maximum(n, 1), 0.0)
        ratio = np.where(p0 > 0, rate / p0, np.where(rate > 0, np.inf, 1.0))
    p = np.ones(len(f))
    test = (n > 0) & (rest_n > 0)
    # P[X >= f]: X the flags a domain of this size would draw from its and the baseline's
    # inputs pooled, without replacement
    p[test] = hypergeom.sf(f[test] - 1, n[test] + rest_n[test], f[test] + rest_f[test],
                           n[test])
    return p, ratio


__all__ = ["domain_suspicion"]
