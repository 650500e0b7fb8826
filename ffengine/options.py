"""The values each scoring option accepts, in one place that imports nothing heavy, so
that the command line offers exactly what ``Engine`` checks without importing torch."""

from __future__ import annotations

from .errors import ConfigError

AGGREGATES = ("mean", "max", "median")  # how a sample's augmentation draws combine
COMBINES = ("mean", "min")  # how the K instances' scores make one detection score
CHECKPOINT_WEIGHTS = ("lr", "rise")  # how checkpoints count besides their learning rate
BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")  # ghost-score kernels
PRECISIONS = ("float32", "bfloat16")  # of the backbone forward
COMPILE_MODES = ("auto", "on", "off")  # the backbone forward through torch.compile
# how the flagged set is cut: the paper's MAD rule, or the MAD flags refined by Otsu's split
# where it is clear (ffengine.detect.split; an experiment, not a default)
THRESHOLD_RULES = ("mad", "mad-split")


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ConfigError that lists them."""
    if value not in choices:
        raise ConfigError(f"{option} {value!r} is unknown; expected one of {choices}.")
    return value
