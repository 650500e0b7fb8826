"""Lazy build and load of the CUDA ghost-score kernels (``csrc/ghost_score_cuda.cu``).

The "cuda" backend is compiled only where it can run: on first use in a process that sees a
CUDA device and finds nvcc (``torch.utils.cpp_extension.CUDA_HOME``), through
``torch.utils.cpp_extension.load`` (ninja), into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``): the first build takes about
a minute, later processes reuse it. Nothing is built at install time, so CPU-only machines
(CI) never compile CUDA code. The source ships in a source checkout (``pip install -e .``).

Every failure is cached with its reason; ``ffengine.ops.ghost_score`` turns it into a
BackendUnavailableError for a named backend, or a fallback with one warning under auto.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import ModuleType

import torch

from ffengine.errors import BackendUnavailableError

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "ghost_score_cuda.cu"
MODULE_NAME = "ffengine_ghost_score_cuda"

_lock = threading.Lock()
_loaded = False
_module: ModuleType | None = None
_reason: str | None = None


def _why_not_buildable() -> str | None:
    """Why the extension cannot be built here (before trying), or None."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) was built without CUDA"
    if not SOURCE.is_file():
        return (
            f"its source {SOURCE} is missing: the CUDA backend builds from a source checkout "
            "(pip install -e .)"
        )
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit that matches torch)"
    return None


def _build() -> tuple[ModuleType | None, str | None]:
    problem = _why_not_buildable()
    if problem is not None:
        return None, problem
    from torch.utils import cpp_extension

    try:
        module = cpp_extension.load(
            name=MODULE_NAME,
            sources=[str(SOURCE)],
            # no --use_fast_math: the scores must match the reference to float32 rounding
            extra_cuda_cflags=["-O3"],
            extra_cflags=["-O3"],
            verbose=False,
        )
    except Exception as e:  # a compiler or linker failure: the backend cannot run here
        return None, f"building {SOURCE.name} failed ({type(e).__name__}: {e})"
    return module, None


def load() -> ModuleType | None:
    """The compiled module (building it on first call), or None; see ``unavailable_reason``."""
    global _loaded, _module, _reason
    with _lock:
        if not _loaded:
            _module, _reason = _build()
            _loaded = True
        return _module


def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run in this process, or None once they are built."""
    load()
    return _reason


def ghost_score_cuda(
    h: torch.Tensor, delta: torch.Tensor, G_w: torch.Tensor, G_b: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dots (B, K), sqnorm (B,))`` from the CUDA kernels, in float32 (float64 for float64
    inputs); the inputs must already have passed ``ghost_score``'s checks. Raises
    BackendUnavailableError, with the reason, where the kernels cannot be built."""
    module = load()
    if module is None:
        raise BackendUnavailableError(f"ghost_score backend 'cuda' cannot run: {_reason}")
    dots, sqnorm = module.ghost_score(h, delta, G_w, G_b)
    return dots, sqnorm


def _reset_for_tests() -> None:
    global _loaded, _module, _reason
    with _lock:
        _loaded, _module, _reason = False, None, None
