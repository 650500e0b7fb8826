"""Named scoring methods: what each sets, and the errors for unknown names."""

from __future__ import annotations

import numpy as np
import pytest

from ffengine.engine.scoring import detection_scores
from ffengine.errors import ConfigError
from ffengine.methods import (
    DEFAULT_CLIP_METHOD,
    DEFAULT_METHOD,
    METHODS,
    default_method_for,
    get_method,
)


def test_paper_method_is_eq5_as_written():
    m = get_method("paper")
    assert m.engine_options() == {"checkpoints": "all", "draws": 1, "aggregate": "mean",
                                  "weighting": "lr", "combine": "mean"}
    assert (m.instances, m.k) == (1, 3.0)
    assert "every checkpoint" in m.describe() and "k = 3" in m.describe()


def test_default_method_exists_and_every_method_is_valid():
    assert DEFAULT_METHOD in METHODS
    for m in METHODS.values():
        assert m.checkpoints in ("all", "last") and m.draws >= 1 and m.instances >= 1
        assert m.aggregate in ("mean", "max", "median") and m.k >= 0
        assert m.weighting in ("lr", "rise") and m.combine in ("mean", "min")


def test_instance_combination_is_described():
    from ffengine.methods import Method

    assert "mean of 5 instances" in get_method("last-max16x5").describe()
    assert "min of 5 instances" in Method(instances=5, combine="min").describe()


def test_unknown_method_says_which_exist():
    with pytest.raises(ConfigError, match="paper"):
        get_method("nope")


class _FakeRun:
    def __init__(self, objective: str):
        self.manifest = {"objective": {"name": objective}}


def test_default_method_follows_the_runs_objective():
    assert default_method_for(_FakeRun("nt_xent")) == DEFAULT_METHOD
    assert default_method_for(_FakeRun("clip_infonce")) == DEFAULT_CLIP_METHOD
    # CLIP scores one fixed view of each image: its default must not ask for more draws
    assert get_method(DEFAULT_CLIP_METHOD).draws == 1


def test_detection_scores_combine_the_instances():
    scores = np.array([[1.0, 3.0, 2.0], [np.nan, np.nan, np.nan], [-1.0, 0.5, 4.0]],
                      dtype=np.float32)
    np.testing.assert_allclose(detection_scores(scores), [2.0, np.nan, 3.5 / 3], rtol=1e-6)
    np.testing.assert_array_equal(detection_scores(scores, "min"), [1.0, np.nan, -1.0])
    assert detection_scores(scores, "min").dtype == np.float32
    with pytest.raises(ConfigError, match="combine"):
        detection_scores(scores, "max")
