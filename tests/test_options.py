"""The command line offers exactly the values the engine accepts, and an unknown value is
refused with an error that lists the accepted ones."""

import numpy as np
import pytest

from ffengine.cli import build_parser
from ffengine.engine.scoring import aggregate_draws, checkpoint_weights, detection_scores
from ffengine.errors import ConfigError
from ffengine.ops.ghost_score import resolve_backend
from ffengine.options import (
    AGGREGATES,
    BACKENDS,
    CHECKPOINT_WEIGHTS,
    COMBINES,
    PRECISIONS,
    check_choice,
)


def _trace_choices() -> dict[str, tuple]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    trace = sub.choices["trace"]
    return {a.dest: tuple(a.choices) for a in trace._actions if a.choices}


def test_trace_offers_the_engines_choices():
    choices = _trace_choices()
    assert choices["aggregate"] == AGGREGATES
    assert choices["combine"] == COMBINES
    assert choices["weighting"] == CHECKPOINT_WEIGHTS
    assert choices["backend"] == BACKENDS
    assert choices["precision"] == PRECISIONS


def test_check_choice_names_the_option_and_the_choices():
    assert check_choice("combine", "min", COMBINES) == "min"
    with pytest.raises(ConfigError, match=r"combine 'max' is unknown; expected one of "
                                          r"\('mean', 'min'\)"):
        check_choice("combine", "max", COMBINES)


@pytest.mark.parametrize("call", [
    lambda: detection_scores([[1.0]], "max"),
    lambda: checkpoint_weights([[0.1], [0.2]], "steps"),
    lambda: aggregate_draws(np.zeros((1, 1, 1, 1)), "sum"),
])
def test_every_function_refuses_an_unknown_value(call):
    with pytest.raises(ConfigError, match="is unknown; expected one of"):
        call()


def test_every_backend_name_resolves_or_says_why():
    # each name the CLI offers is known to the resolver: it either resolves or explains
    # why the backend is unavailable here, never "unknown backend"
    for name in BACKENDS:
        try:
            resolve_backend(name)
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            assert "unknown" not in str(e), (name, e)
