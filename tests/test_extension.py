"""The compiled core ffengine._C: version, direct calls, argument checks, lazy loading."""

from __future__ import annotations

import re
import sys
import types
import warnings

import numpy as np
import pytest
import torch

import ffengine
from ffengine import _ext
from ffengine.reference import ghost_score_reference

from .conftest import TOLERANCES


@pytest.fixture
def fresh_loader():
    _ext._reset_for_tests()
    yield
    _ext._reset_for_tests()


def _arrays(rng: np.random.Generator, dtype, B=6, V=2, d_in=37, d_out=19, K=3):
    h = rng.standard_normal((B, V, d_in)).astype(dtype)
    delta = rng.standard_normal((B, V, d_out)).astype(dtype)
    G_w = rng.standard_normal((K, d_out, d_in)).astype(dtype)
    G_b = rng.standard_normal((K, d_out)).astype(dtype)
    return h, delta, G_w, G_b


@pytest.fixture
def np_rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_version_matches_package(ext):
    assert ext.__version__ == ffengine.__version__


def test_has_openmp_is_bool(ext):
    assert isinstance(ext.has_openmp, bool)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_direct_call_matches_reference(ext, np_rng, dtype, bias):
    h, delta, G_w, G_b = _arrays(np_rng, dtype)
    G_b = G_b if bias else None
    dots, sqnorm = ext.ghost_score(h, delta, G_w, G_b)
    assert isinstance(dots, np.ndarray) and dots.dtype == dtype and dots.shape == (6, 3)
    assert isinstance(sqnorm, np.ndarray) and sqnorm.dtype == dtype and sqnorm.shape == (6,)
    ref = ghost_score_reference(
        *(None if a is None else torch.from_numpy(a).double() for a in (h, delta, G_w, G_b))
    )
    tol = TOLERANCES[torch.from_numpy(h).dtype]
    for got, want in zip((dots, sqnorm), ref, strict=True):
        want = want.numpy()
        assert np.abs(got - want).max() <= tol * np.abs(want).max()


# The compiled op packs G_w into panels of 64 bytes of outputs (16 float, 8 double) and runs a
# register tile of 5 rows of h: every remainder of rows (B·V) and outputs (d_out) against them.
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("d_out", [1, 7, 8, 9, 15, 16, 17, 33])
@pytest.mark.parametrize("B, V", [(1, 1), (1, 2), (2, 2), (3, 1), (3, 2), (5, 1), (6, 2), (13, 1)])
def test_direct_call_at_tile_and_panel_remainders(ext, np_rng, dtype, d_out, B, V):
    h, delta, G_w, G_b = _arrays(np_rng, dtype, B=B, V=V, d_in=11, d_out=d_out, K=2)
    dots, sqnorm = ext.ghost_score(h, delta, G_w, G_b, num_threads=2)
    ref = ghost_score_reference(*(torch.from_numpy(a).double() for a in (h, delta, G_w, G_b)))
    tol = TOLERANCES[torch.from_numpy(h).dtype]
    for got, want in zip((dots, sqnorm), ref, strict=True):
        want = want.numpy()
        assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_thread_count_does_not_change_results(ext, np_rng):
    h, delta, G_w, G_b = _arrays(np_rng, np.float32, B=33)
    one = ext.ghost_score(h, delta, G_w, G_b, num_threads=1)
    many = ext.ghost_score(h, delta, G_w, G_b, num_threads=2)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(a, b)


def _bad(name, np_rng):
    h, delta, G_w, G_b = _arrays(np_rng, np.float64)
    return {
        "h_ndim": (
            (h[0], delta, G_w, G_b),
            "argument 'h' must have 3 dimensions (B, V, d_in); received shape (2, 37)",
        ),
        "delta_shape": (
            (h, delta[:, :1], G_w, G_b),
            "argument 'delta' must have shape "
            "(B, V, d_out) with (B, V) = (6, 2) as in h (6, 2, 37); "
            "received (6, 1, 19)",
        ),
        "G_w_shape": (
            (h, delta, G_w[:, :, 1:], G_b),
            "argument 'G_w' must have shape (K, d_out, d_in) with (d_out, d_in) = (19, 37)",
        ),
        "G_b_shape": (
            (h, delta, G_w, G_b[:, 1:]),
            "argument 'G_b' must have shape (K, d_out) = (3, 19); received (3, 18)",
        ),
        "int_dtype": (
            (h.astype(np.int64), delta, G_w, G_b),
            "argument 'h' must have dtype float32 or float64; received int64",
        ),
        "mixed_dtype": (
            (h, delta, G_w.astype(np.float32), G_b),
            "argument 'G_w' must have dtype float64 like h; received float32",
        ),
        "non_contiguous": (
            (h, delta, np.asfortranarray(G_w), G_b),
            "argument 'G_w' must be C-contiguous",
        ),
    }[name]


@pytest.mark.parametrize(
    "case",
    [
        "h_ndim",
        "delta_shape",
        "G_w_shape",
        "G_b_shape",
        "int_dtype",
        "mixed_dtype",
        "non_contiguous",
    ],
)
def test_argument_checks_name_the_argument(ext, np_rng, case):
    args, message = _bad(case, np_rng)
    with pytest.raises(ValueError, match=re.escape(message)):
        ext.ghost_score(*args)


def test_load_is_cached_and_silent(ext):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.load_extension() is ext
        assert _ext.extension_available()
        assert _ext.unavailable_reason() is None


def test_import_error_warns_once(fresh_loader, monkeypatch):
    monkeypatch.setitem(sys.modules, "ffengine._C", None)
    with pytest.warns(RuntimeWarning) as record:
        assert _ext.load_extension() is None
        assert _ext.load_extension() is None
        assert not _ext.extension_available()
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(_ext.WARNING_PREFIX)
    assert "cannot import ffengine._C" in message and "pure-torch backend" in message


def test_stale_build_is_rejected(fresh_loader, monkeypatch):
    stale = types.ModuleType("ffengine._C")
    stale.__version__ = "0.0.0-stale"
    monkeypatch.setitem(sys.modules, "ffengine._C", stale)
    with pytest.warns(RuntimeWarning, match="rebuild with pip install -e .") as record:
        assert _ext.load_extension() is None
    assert len(record) == 1
    assert "'0.0.0-stale'" in str(record[0].message)
    assert ffengine.__version__ in _ext.unavailable_reason()
