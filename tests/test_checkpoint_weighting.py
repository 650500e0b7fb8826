"""Checkpoint weighting by the cosine's rise (Engine's ``weighting="rise"``) against an
explicit loop, on fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from ffengine.engine.scoring import aggregate_draws, checkpoint_weights
from ffengine.errors import ConfigError

from .conftest import SEED


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


def test_rise_weights_are_the_positive_rise_since_the_previous_checkpoint(rng):
    cos = rng.uniform(-1, 1, size=(6, 3)).astype(np.float32)
    w = checkpoint_weights(cos, "rise")
    assert w.shape == (6, 3)
    for k in range(3):
        assert w[0, k] == 0.0  # the rise into the first checkpoint is unknown
        for t in range(1, 6):
            rise = float(cos[t, k]) - float(cos[t - 1, k])
            assert w[t, k] == pytest.approx(max(0.0, rise), abs=1e-7)
    assert checkpoint_weights(cos, "lr") is None
    with pytest.raises(ConfigError, match="rise"):
        checkpoint_weights(cos, "steps")


@pytest.mark.parametrize("how", ["mean", "max", "median"])
def test_weighted_aggregation_equals_a_loop(rng, how):
    T, D, n, K = 4, 3, 11, 2
    terms = rng.normal(size=(T, D, n, K)).astype(np.float32)
    w = rng.uniform(0, 2, size=(T, K))
    got = aggregate_draws(terms, how, w)
    want = np.zeros((n, K))
    red = {"mean": np.mean, "max": np.max, "median": np.median}[how]
    for i in range(n):
        for k in range(K):
            per_draw = [sum(w[t, k] * float(terms[t, d, i, k]) for t in range(T))
                        for d in range(D)]
            want[i, k] = red(per_draw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # all-ones weights are Eq. 5's plain sum
    np.testing.assert_allclose(aggregate_draws(terms, how, np.ones((T, K))),
                               aggregate_draws(terms, how), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="shape"):
        aggregate_draws(terms, how, np.ones((T, K + 1)))


def test_an_instance_whose_cosine_never_rose_is_reported():
    cos = np.array([[0.9, 0.1], [0.8, 0.5], [0.7, 0.4]])
    with pytest.warns(UserWarning, match=r"never rose .* instance\(s\) \[0\]"):
        w = checkpoint_weights(cos, "rise")
    np.testing.assert_allclose(w[:, 0], 0.0)
    np.testing.assert_allclose(w[:, 1], [0.0, 0.4, 0.0])
