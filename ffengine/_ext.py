"""Lazy loader of the optional compiled core ``ffengine._C``.

The extension is imported on first use, once per process. It counts as unavailable when the
import fails or when it was built for another ffengine version (a stale ``.so``); either way
one ``RuntimeWarning`` says why, and ffengine runs on its pure-torch backend.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from types import ModuleType

import ffengine

_MODULE_NAME = "ffengine._C"
# pyproject.toml's filterwarnings matches this prefix: keep them in sync.
WARNING_PREFIX = "ffengine compiled extension unavailable"

_lock = threading.Lock()
_loaded = False
_module: ModuleType | None = None
_reason: str | None = None


def _import() -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module(_MODULE_NAME)
    except ImportError as e:
        return None, (
            f"cannot import {_MODULE_NAME} ({type(e).__name__}: {e}); "
            "build it with pip install -e ."
        )
    built_for = getattr(module, "__version__", None)
    if built_for != ffengine.__version__:
        return None, (
            f"{_MODULE_NAME} was built for ffengine {built_for!r} but the package is "
            f"{ffengine.__version__!r}; rebuild with pip install -e ."
        )
    return module, None


def load_extension() -> ModuleType | None:
    """The compiled module ``ffengine._C``, or ``None`` when it is unavailable.

    Imports once per process; on failure warns once (``RuntimeWarning``) with the reason.
    """
    global _loaded, _module, _reason
    with _lock:
        if _loaded:
            return _module
        _module, _reason = _import()
        _loaded = True
    if _module is None:
        warnings.warn(
            f"{WARNING_PREFIX}: {_reason}; using the pure-torch backend (slower)",
            RuntimeWarning,
            stacklevel=2,
        )
    return _module


def extension_available() -> bool:
    """Whether ``ffengine._C`` imports and matches the package version."""
    return load_extension() is not None


def unavailable_reason() -> str | None:
    """Why the extension is unavailable, or ``None`` when it loaded."""
    load_extension()
    return _reason


def _reset_for_tests() -> None:
    """Forget the cached import result (tests only); the next load imports and warns again."""
    global _loaded, _module, _reason
    with _lock:
        _loaded, _module, _reason = False, None, None
