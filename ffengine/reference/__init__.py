"""Pure-torch reference versions of every fast op: slow, obviously correct, shipped so that
tests and benchmarks can compare the fast backends against them."""

from ffengine.reference.ghost_score import ghost_score_reference

__all__ = ["ghost_score_reference"]
