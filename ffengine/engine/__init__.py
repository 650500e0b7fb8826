"""The scoring engine: cosine gradients, per-sample head signals, ghost scores."""

from .instance import Instance, load_instance
from .scoring import Engine, ScoreResult

__all__ = ["Engine", "Instance", "ScoreResult", "load_instance"]
