"""Public fast ops. Each picks a backend ("auto", "torch", "cpu", "triton", "cuda") and
matches its pure-torch reference in ``ffengine.reference``.

Note: ``ffengine.ops.ghost_score`` is the function; the module that defines it is
``sys.modules["ffengine.ops.ghost_score"]`` (``from ffengine.ops.ghost_score import ...`` works).
"""

from ffengine.ops.ghost_score import (
    BACKENDS,
    ENV_VAR,
    ghost_score,
    ghost_score_torch,
    resolve_backend,
)

__all__ = ["BACKENDS", "ENV_VAR", "ghost_score", "ghost_score_torch", "resolve_backend"]
