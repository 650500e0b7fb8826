"""Otsu's split of a flagged set (ffengine.detect.split) against a brute-force search over
every cut, on fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from ffengine.detect import flag
from ffengine.detect.split import OTSU_MIN_ETA, otsu_split, refine_by_split


def _brute_force_otsu(x):
    """Every cut between consecutive sorted values, the group variances computed directly."""
    x = np.sort(np.asarray(x, np.float64))
    best = (-1.0, None)
    for i in range(1, len(x)):
        lo, hi = x[:i], x[i:]
        between = len(lo) * len(hi) / len(x) ** 2 * (lo.mean() - hi.mean()) ** 2
        if between > best[0]:
            best = (between, (x[i - 1] + x[i]) / 2)
    return best[1], best[0] / x.var()


@pytest.mark.parametrize("seed", range(6))
def test_otsu_split_matches_a_brute_force_search(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0, 1, 200 + seed * 37), rng.normal(4, 0.5, 40 + seed)])
    if seed % 2:  # float32 scores, as the engine writes them
        x = x.astype(np.float32)
    thr, eta = otsu_split(rng.permutation(x))
    ref_thr, ref_eta = _brute_force_otsu(x)
    assert thr == pytest.approx(ref_thr, rel=1e-12) and eta == pytest.approx(ref_eta, rel=1e-9)
    assert 0.0 < eta < 1.0


def test_otsu_split_of_two_values_and_of_inputs_it_cannot_split():
    assert otsu_split(np.array([1.0, 3.0])) == (2.0, 1.0)
    assert otsu_split(np.full(5, 2.0)) == (2.0, 0.0)
    assert otsu_split(np.array([1.0])) == (1.0, 0.0)
    assert otsu_split(np.array([])) == (np.inf, 0.0)


@pytest.mark.parametrize("seed", range(4))
def test_refine_by_split_keeps_the_upper_group_of_a_clear_split_only(seed):
    rng = np.random.default_rng(100 + seed)
    clean = rng.standard_normal(5000)
    tail = rng.uniform(6.5, 9.0, 200) * 0.6745  # just above k = 6 (MAD units of a normal)
    poisons = rng.normal(30.0, 1.0, 300) * 0.6745  # far above it
    x = rng.permutation(np.concatenate([clean, tail, poisons]))
    flagged = flag(x, 6.0)
    kept, split = refine_by_split(x, flagged)
    ref_thr, ref_eta = _brute_force_otsu(x[flagged])
    assert split.applied and split.eta > OTSU_MIN_ETA
    assert split.eta == pytest.approx(ref_eta, rel=1e-9)
    # the reference: every flagged id whose score is above the brute-force cut
    np.testing.assert_array_equal(kept, flagged[x[flagged] > ref_thr])
    assert set(np.flatnonzero(x > 20.0 * 0.6745)) == set(kept)

    # one blob above the threshold: no clear split, the flags stay
    # (a tail that thins out upwards: Otsu's η of an exponential is about 0.65, of a uniform
    # about 0.75, of two separate clusters near 1)
    blob = np.concatenate([clean, (6.5 + rng.exponential(1.0, 400)) * 0.6745])
    flagged = flag(blob, 6.0)
    kept, split = refine_by_split(blob, flagged)
    assert not split.applied and 0 < split.eta < OTSU_MIN_ETA
    np.testing.assert_array_equal(kept, flagged)
    # the ungated split (min_eta 0) cuts it anyway
    assert len(refine_by_split(blob, flagged, 0.0)[0]) < len(flagged)


def test_refine_by_split_never_drops_a_set_it_cannot_split():
    x = np.concatenate([np.random.default_rng(1).standard_normal(1000), np.full(20, 50.0)])
    flagged = flag(x, 6.0)
    kept, split = refine_by_split(x, flagged, 0.0)  # even ungated
    assert split.eta == 0.0 and not split.applied
    np.testing.assert_array_equal(kept, np.arange(1000, 1020))
    kept, split = refine_by_split(x, np.zeros(0, np.int64), 0.0)
    assert kept.size == 0 and not split.applied
    with pytest.raises(ValueError, match="min_eta"):
        refine_by_split(x, flagged, 1.5)
