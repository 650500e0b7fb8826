"""Exact streaming median / median absolute deviation (MAD) and the MAD outlier rule.

DESIGN.md section 3: ``M = median(s)``, ``MAD = median(|s - M|)``, flag ``s_i > M + k * MAD``
(default ``k = 3``).

Exactness
    Both medians are found by :mod:`ffengine.detect.select` (streaming radix selection over
    order-preserving integer keys), never approximated, with memory bounded by one chunk plus
    a few 512 KiB histograms, whatever the input size. The results equal numpy's bit for bit:
    ``median`` is ``np.mean`` of the one or two middle values in the array's dtype, exactly
    what ``np.median`` computes; ``mad`` is that same median of ``np.abs(x - median)`` with
    the deviations computed in the array's dtype, chunk by chunk (never materialized).
    Passes over the data: 2 + 2 for float32, 4 + 4 for float64.

Input
    A 1-D numpy array, a memmap, or a ``str``/``Path`` to a ``.npy`` file (opened with
    ``mmap_mode="r"``). float32/float64 are used as stored and results are numpy scalars of
    that dtype; integer/bool inputs are converted to float64 and float16 to float32, one
    chunk at a time.

NaN policy
    NaN scores are excluded from every statistic and counted (``MADStats.n_nan``, or
    ``median_mad(..., return_nan_count=True)``); they are never flagged. An empty or all-NaN
    input raises :class:`~ffengine.errors.DataError`.

Infinities and signed zeros
    ``±inf`` are ordinary values, as in numpy. If the median is NaN (the mean of ``-inf``
    and ``+inf``) or infinite while some score equals it (``inf - inf`` is NaN), numpy's MAD
    is NaN and so is ours; then nothing is flagged. The mean of two huge middle values may
    overflow to ``inf`` in float32, exactly as in ``np.median``. ``-0.0`` and ``+0.0`` tie;
    a zero median or MAD is returned as ``+0.0``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffengine.detect.select import (
    DEFAULT_CHUNK_SIZE,
    ScoresLike,
    ScoreSource,
    open_scores,
    run_selection,
)
from ffengine.errors import ConfigError, DataError
from ffengine.io_utils import atomic_path

__all__ = [
    "DEFAULT_K",
    "MADStats",
    "flag",
    "median_mad",
    "median_ranks",
    "robust_stats",
    "threshold",
]

DEFAULT_K = 3.0


@dataclass(frozen=True)
class MADStats:
    """Robust location/scale of a score vector.

    ``median``/``mad`` are numpy scalars of the working dtype; ``n`` counts the non-NaN
    scores and ``n_nan`` the excluded NaNs; ``passes`` is the number of streaming passes the
    computation made over the data.
    """

    median: np.floating
    mad: np.floating
    n: int
    n_nan: int
    passes: int

    @property
    def dtype(self) -> np.dtype:
        return np.asarray(self.median).dtype

    def threshold(self, k: float = DEFAULT_K) -> np.floating:
        """``median + k * mad`` in the working dtype (what numpy computes for a float ``k``)."""
        k = _check_k(k)
        t = self.dtype.type
        with np.errstate(over="ignore", invalid="ignore"):
            return t(self.median + t(k) * self.mad)


def median_ranks(n: int) -> list[int]:
    """0-based ranks of the middle value(s) of ``n`` sorted values: one if odd, two if even."""
    lo, hi = (n - 1) // 2, n // 2
    return [lo] if lo == hi else [lo, hi]


def _mean_of_middle(values: np.ndarray) -> np.floating:
    # np.median returns np.mean of the one or two middle values in the array's dtype; call the
    # same function on the same values so overflow ((a+b) -> inf) and rounding match exactly.
    with np.errstate(over="ignore", invalid="ignore"):
        return np.mean(values)


def _check_k(k: float) -> float:
    try:
        kf = float(k)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"k must be a number >= 0; received {k!r}") from e
    if not kf >= 0:  # also rejects NaN
        raise ConfigError(
            f"k must be >= 0 (flag s > median + k * MAD; default {DEFAULT_K}); received {k!r}"
        )
    return kf


def robust_stats(
    x: ScoresLike | ScoreSource | Sequence[float],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    parallel: bool | None = None,
    allreduce: Callable[[np.ndarray], np.ndarray] | None = None,
) -> MADStats:
    """Exact median and MAD of a 1-D score array, memmap or ``.npy`` path (NaNs excluded).

    See the module docstring for the exactness guarantee, dtype and NaN rules. Raises
    :class:`~ffengine.errors.DataError` for empty, all-NaN, non-1-D or non-numeric input.

    Sharded input: with ``allreduce`` (see :func:`~ffengine.detect.select.run_selection`),
    ``x`` is this process's shard and the statistics are those of the concatenation of
    all processes' shards, exact and identical on every process. Every process must call
    with the same dtype; a shard may be empty, the union may not. ``n``/``n_nan`` are
    global counts.
    """
    with open_scores(x) as src:
        dtype = src.dtype
        if src.n_total == 0 and allreduce is None:
            where = f"score file {src.path}" if src.path is not None else "the score array"
            raise DataError(
                f"cannot compute the median/MAD: {where} is empty (shape (0,)); expected at "
                "least one non-NaN score"
            )

        def values():
            return (c for _, c in src.chunks(chunk_size))

        sel = run_selection(values, dtype, median_ranks, parallel=parallel,
                            allreduce=allreduce)
        median = _mean_of_middle(sel.result())
        if median == 0:  # the mean of -tiny and 0 rounds to -0.0: return zeros as +0.0
            median = dtype.type(0)
        passes = sel.passes_done
        if np.isnan(median):  # mean of -inf and +inf: every deviation is NaN, so is the MAD
            mad = dtype.type(np.nan)
        else:
            buf = np.empty(min(int(chunk_size), max(src.n_total, 1)), dtype)

            def deviations():
                for _, c in src.chunks(chunk_size):
                    d = buf[: c.shape[0]]
                    with np.errstate(over="ignore", invalid="ignore"):
                        np.subtract(c, median, out=d)
                    np.abs(d, out=d)
                    yield d

            dev = run_selection(deviations, dtype, median_ranks, parallel=parallel,
                                empty_ok=True, allreduce=allreduce)
            passes += dev.passes_done
            # Deviations that are NaN although the score is not (inf - inf, when the median
            # is infinite) make numpy's median of deviations NaN; match it.
            mad = dtype.type(np.nan) if dev.n_nan > sel.n_nan else _mean_of_middle(dev.result())
    return MADStats(median=dtype.type(median), mad=dtype.type(mad), n=int(sel.n),
                    n_nan=int(sel.n_nan), passes=passes)


def median_mad(
    x: ScoresLike | ScoreSource | Sequence[float],
    *,
    return_nan_count: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    parallel: bool | None = None,
    allreduce: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.floating, np.floating] | tuple[np.floating, np.floating, int]:
    """``(median, mad)`` (numpy scalars of the working dtype), plus ``n_nan`` if asked.

    ``allreduce``: ``x`` is one process's shard, see :func:`robust_stats`."""
    s = robust_stats(x, chunk_size=chunk_size, parallel=parallel, allreduce=allreduce)
    return (s.median, s.mad, s.n_nan) if return_nan_count else (s.median, s.mad)


def threshold(
    x: ScoresLike | ScoreSource | Sequence[float],
    k: float = DEFAULT_K,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.floating:
    """The flagging threshold ``median + k * mad`` (numpy scalar of the working dtype)."""
    _check_k(k)
    return robust_stats(x, chunk_size=chunk_size).threshold(k)


def flag(
    x: ScoresLike | ScoreSource | Sequence[float],
    k: float = DEFAULT_K,
    out: str | os.PathLike[str] | None = None,
    *,
    stats: MADStats | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.ndarray | Path:
    """Indices ``i`` (int64, ascending) with ``x[i] > median + k * mad``; NaN is never flagged.

    ``stats`` skips recomputing the median/MAD (it must come from the same ``x``). With
    ``out`` the indices are streamed into a ``.npy`` file at exactly that path (written
    atomically, two passes: count, then fill) and the path is returned, so the index list
    never has to fit in memory. Raises :class:`~ffengine.errors.ConfigError` if ``k < 0``.
    """
    k = _check_k(k)
    with open_scores(x) as src:
        if stats is None:
            stats = robust_stats(src, chunk_size=chunk_size)
        thr = stats.threshold(k)
        if out is None:
            parts = [np.flatnonzero(c > thr) + off for off, c in src.chunks(chunk_size)]
            return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        count = sum(int(np.count_nonzero(c > thr)) for _, c in src.chunks(chunk_size))
        dest = Path(out)
        with atomic_path(dest) as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(count,))
            pos = 0
            for off, c in src.chunks(chunk_size):
                idx = np.flatnonzero(c > thr)
                mm[pos : pos + idx.shape[0]] = idx + off
                pos += idx.shape[0]
            if pos != count:
                raise DataError(f"input changed while flagging: counted {count}, found {pos}")
            mm.flush()
            del mm
    return dest
