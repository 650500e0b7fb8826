"""Exact k-th order statistics of huge 1-D float arrays by streaming radix selection.

Keys
    Every float maps to an unsigned integer of the same width whose order is the float order
    (:func:`float_keys`): for a non-negative float set the sign bit, for a negative one flip
    all bits. ``-0.0`` is keyed as ``+0.0`` (they compare equal in numpy, so they must tie);
    ``-inf``/``+inf`` get the smallest/largest keys; NaN gets no key: it is excluded and
    counted.

Selection
    The key is read as ``key_bits / 16`` digits of 16 bits, most significant first (2 passes
    for float32, 4 for float64). Pass ``p`` builds, over every value whose key matches a
    target's already-known ``16 p`` high bits (its *prefix*), a histogram of the next digit;
    the cumulative histogram tells which digit bin holds the target rank, which extends the
    prefix by 16 bits. After the last pass the prefix is the whole key, hence the exact value.
    Several ranks are selected in the same passes (targets with one prefix share a histogram).

Streaming and sharding
    :class:`RadixSelector` is a small state machine that never sees the whole input:
    ``selector.histogram(chunk, out=h)`` adds one chunk's counts to ``h`` and
    ``selector.advance(h)`` consumes the total of one pass. Histograms are plain ``int64``
    arrays, so histograms from separate chunks, threads or processes simply add (all-reduce
    with a sum) before ``advance``. Memory is one histogram per distinct prefix
    (``65537 x 8`` bytes) plus the caller's chunk, whatever the input size.

NaN policy: NaN values are never keyed; they are counted in the extra last bin of row 0 of
the pass-0 histogram and reported as :attr:`RadixSelector.n_nan`; ranks refer to the sorted
non-NaN values only.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numba
import numpy as np

from ffengine.errors import ConfigError, DataError, FFEngineError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "RADIX",
    "RADIX_BITS",
    "RadixSelector",
    "ScoreSource",
    "float_keys",
    "keys_to_floats",
    "kth_smallest",
    "open_scores",
    "run_selection",
]

RADIX_BITS = 16
RADIX = 1 << RADIX_BITS
DEFAULT_CHUNK_SIZE = 1 << 22
# parallel=None picks the prange kernel only for chunks of at least this many values (shorter
# ones cost more to zero and merge per-thread histograms than to scan) and only with more than
# _PARALLEL_MIN_THREADS Numba threads: with 2 threads on a shared 2-core machine the OpenMP
# barrier waits for a descheduled thread (measured: median 13 ms serial vs 56 ms parallel per
# 2^22 float32 chunk), so the best case (2x) is not worth the typical loss.
_PARALLEL_MIN_CHUNK = 1 << 18
_PARALLEL_MIN_THREADS = 2

_U64_DIGIT_MASK = np.uint64(RADIX - 1)
_U64_ZERO = np.uint64(0)
_KEY_CONSTANTS = {  # itemsize -> (sign bit, all-ones) as uint64, shared by both widths
    4: (np.uint64(1 << 31), np.uint64(0xFFFF_FFFF)),
    8: (np.uint64(1 << 63), np.uint64(0xFFFF_FFFF_FFFF_FFFF)),
}
_UINT_OF = {4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------------------
# Numba kernels. All key arithmetic is done in uint64 with uint64 constants: mixing a
# uint64 with an int64 literal would silently promote to float64 in Numba.
# --------------------------------------------------------------------------------------
@numba.njit(nogil=True, cache=True)
def _hist_range(x, u, lo, hi, sign, full, shift, prefmask, prefixes, hist):  # pragma: no cover
    ngroups = prefixes.shape[0]
    top = np.uint64(x.itemsize * 8 - 1)
    nan = 0
    for i in range(lo, hi):
        v = x[i]
        if v != v:
            nan += 1
            continue
        # Branch-free key (a sign branch mispredicts half the time on scores around 0):
        # negative -> flip all bits, non-negative -> set the sign bit.
        b = np.uint64(u[i])
        k = b ^ (((_U64_ZERO - (b >> top)) & full) | sign)
        if v == 0:
            k = sign  # key of +0.0: -0.0 and +0.0 tie
        p = k & prefmask
        for g in range(ngroups):
            if p == prefixes[g]:
                hist[g, (k >> shift) & _U64_DIGIT_MASK] += 1
                break
    hist[0, hist.shape[1] - 1] += nan


@numba.njit(nogil=True, cache=True)
def _hist_serial(x, u, sign, full, shift, prefmask, prefixes, hist):  # pragma: no cover
    _hist_range(x, u, 0, x.shape[0], sign, full, shift, prefmask, prefixes, hist)


@numba.njit(nogil=True, cache=True, parallel=True)
def _hist_parallel(x, u, sign, full, shift, prefmask, prefixes, hist, nblocks):  # pragma: no cover
    n = x.shape[0]
    local = np.zeros((nblocks, hist.shape[0], hist.shape[1]), np.int64)
    step = (n + nblocks - 1) // nblocks
    for b in numba.prange(nblocks):
        lo = min(n, b * step)
        hi = min(n, lo + step)
        _hist_range(x, u, lo, hi, sign, full, shift, prefmask, prefixes, local[b])
    for b in range(nblocks):
        hist += local[b]


# --------------------------------------------------------------------------------------
# Keys (vectorized numpy versions, for callers and tests; the kernels inline the same rule)
# --------------------------------------------------------------------------------------
def _check_float_dtype(dtype: np.dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind != "f" or dt.itemsize not in _UINT_OF:
        raise ConfigError(
            f"radix selection works on float32 or float64 keys; received dtype {dt}. "
            "Convert the scores (integers and float16 are widened by open_scores)."
        )
    return dt.newbyteorder("=")


def float_keys(x: np.ndarray) -> np.ndarray:
    """Order-preserving unsigned keys of a float32/float64 array (uint32/uint64, same shape).

    ``a < b  <=>  key(a) < key(b)`` for non-NaN ``a, b``; ``key(-0.0) == key(+0.0)``. NaN
    entries get an arbitrary key: mask them out before using the result.
    """
    x = np.asarray(x)
    dt = _check_float_dtype(x.dtype)
    x = np.where(x == 0, dt.type(0), x).astype(dt, copy=False)  # canonical +0.0
    ut = _UINT_OF[dt.itemsize]
    sign = ut.type(_KEY_CONSTANTS[dt.itemsize][0])
    b = x.view(ut)
    return np.where(b & sign, ~b, b | sign).astype(ut, copy=False)


def keys_to_floats(keys: np.ndarray | Sequence[int], dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`float_keys`: the float (of ``dtype``) whose key is each entry."""
    dt = _check_float_dtype(dtype)
    ut = _UINT_OF[dt.itemsize]
    k = np.asarray(keys, dtype=np.uint64).astype(ut)
    sign = ut.type(_KEY_CONSTANTS[dt.itemsize][0])
    bits = np.where(k & sign, k & ~sign, ~k).astype(ut, copy=False)
    return bits.view(dt)


# --------------------------------------------------------------------------------------
# State machine
# --------------------------------------------------------------------------------------
RanksArg = Sequence[int] | np.ndarray | Callable[[int], Sequence[int]]


class RadixSelector:
    """Exact selection of ranks ``ks`` (0-based, among non-NaN values) in streaming passes.

    An input without non-NaN values raises :class:`DataError` after pass 0, unless
    ``empty_ok``: then the selection ends there and ``result()`` is empty.

    ``ranks`` is a sequence of ints or a callable ``n -> ranks`` evaluated once the number
    ``n`` of non-NaN values is known (after pass 0), e.g. the median's middle ranks.

    Protocol (one iteration per pass, ``n_passes`` = 2 for float32, 4 for float64)::

        sel = RadixSelector(np.float32, ranks=[k])
        while not sel.done:
            h = sel.empty_histogram()                # (n_groups, RADIX + 1) int64 zeros
            for chunk in chunks():                   # any split, any order
                sel.histogram(chunk, out=h)          # adds; or sum histograms across processes
            sel.advance(h)                           # checks counts, extends the prefixes
        values = sel.result()                        # (len(ranks),) of the dtype

    Row ``g`` of a histogram counts the next digit of values whose key carries prefix
    ``sel.prefixes[g]``; column ``RADIX`` of row 0 counts NaNs. Every process must call
    ``advance`` with the same total so that all stay in the same state.
    """

    def __init__(
        self,
        dtype: np.dtype | type,
        ranks: RanksArg,
        *,
        parallel: bool | None = None,
        empty_ok: bool = False,
    ):
        self.dtype = _check_float_dtype(np.dtype(dtype))
        self.key_bits = self.dtype.itemsize * 8
        self.n_passes = self.key_bits // RADIX_BITS
        self._sign, self._full = _KEY_CONSTANTS[self.dtype.itemsize]
        self._uint = _UINT_OF[self.dtype.itemsize]
        self._ranks_arg = ranks
        self.parallel = parallel
        self.empty_ok = empty_ok
        self.passes_done = 0  # streaming passes consumed (< n_passes only for empty input)
        self.pass_index = 0
        self.n: int | None = None
        self.n_nan: int | None = None
        self.ranks: np.ndarray | None = None
        self._rank_left: np.ndarray | None = None  # rank within the current prefix bucket
        self._prefix: np.ndarray | None = None  # per-target key prefix (uint64)
        self._expected: np.ndarray | None = None  # per-target size of its prefix bucket
        self.prefixes = np.zeros(1, np.uint64)  # distinct prefixes = histogram rows

    # -- pass geometry -----------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.pass_index >= self.n_passes

    @property
    def shift(self) -> int:
        """Right shift that brings the current pass's digit to the low 16 bits."""
        return self.key_bits - RADIX_BITS * (self.pass_index + 1)

    @property
    def prefix_mask(self) -> int:
        """Mask of the key bits already fixed (0 in pass 0)."""
        free = self.key_bits - RADIX_BITS * self.pass_index
        return ((1 << self.key_bits) - 1) & ~((1 << free) - 1)

    def empty_histogram(self) -> np.ndarray:
        """A zero histogram for the current pass: ``(len(self.prefixes), RADIX + 1)`` int64."""
        self._check_not_done()
        return np.zeros((self.prefixes.shape[0], RADIX + 1), np.int64)

    # -- per-chunk work ----------------------------------------------------------------
    def histogram(self, chunk: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Add the current pass's digit counts of ``chunk`` (1-D, this dtype) to ``out``.

        Returns ``out`` (a new zero histogram when ``None``). Safe to call from several
        threads on separate ``out`` arrays: the kernels release the GIL. ``parallel`` (set at
        construction) picks the Numba ``prange`` kernel (``True``), the serial one
        (``False``), or decides per chunk (``None``: parallel for chunks of at least 2^18
        values when Numba has more than 2 threads).
        """
        self._check_not_done()
        hist = self.empty_histogram() if out is None else out
        expected_shape = (self.prefixes.shape[0], RADIX + 1)
        if hist.shape != expected_shape or hist.dtype != np.int64:
            raise ConfigError(
                f"histogram `out` must be int64 of shape {expected_shape} for pass "
                f"{self.pass_index}; received {hist.dtype} {hist.shape}. "
                "Use selector.empty_histogram()."
            )
        chunk = np.asarray(chunk)
        if chunk.ndim != 1:
            raise DataError(f"chunks must be 1-D; received shape {chunk.shape}")
        if chunk.dtype != self.dtype:
            raise DataError(
                f"chunk dtype {chunk.dtype} differs from the selector's {self.dtype}; "
                "convert chunks with ScoreSource.chunks() or astype before histogramming"
            )
        if chunk.shape[0] == 0:
            return hist
        chunk = np.ascontiguousarray(chunk)
        u = chunk.view(self._uint)
        args = (chunk, u, self._sign, self._full, np.uint64(self.shift),
                np.uint64(self.prefix_mask), self.prefixes, hist)
        nthreads = numba.get_num_threads()
        use_parallel = self.parallel
        if use_parallel is None:
            use_parallel = (nthreads > _PARALLEL_MIN_THREADS
                            and chunk.shape[0] >= _PARALLEL_MIN_CHUNK)
        if use_parallel:
            _hist_parallel(*args, max(1, nthreads))
        else:
            _hist_serial(*args)
        return hist

    # -- per-pass state transition -----------------------------------------------------
    def advance(self, hist: np.ndarray) -> None:
        """Consume the total histogram of the current pass and move to the next one."""
        self._check_not_done()
        hist = np.asarray(hist)
        expected_shape = (self.prefixes.shape[0], RADIX + 1)
        if hist.shape != expected_shape:
            raise DataError(
                f"pass {self.pass_index} histogram must have shape {expected_shape}; "
                f"received {hist.shape}"
            )
        counts = hist[:, :RADIX].astype(np.int64, copy=False)
        if (counts < 0).any():
            raise DataError(f"pass {self.pass_index} histogram has negative counts")
        self.passes_done += 1
        if self.pass_index == 0:
            self._start(int(counts[0].sum()), int(hist[0, RADIX]))
            if self.n == 0:  # only reached with empty_ok: nothing to select
                self.pass_index = self.n_passes
                return
        group_of = np.searchsorted(self.prefixes, self._prefix)
        totals = counts.sum(axis=1)
        # Every pass must see exactly the values that fell into the previous pass's bin;
        # anything else means the input changed between passes (or a shard was missed).
        if not np.array_equal(totals[group_of], self._expected):
            raise DataError(
                f"pass {self.pass_index} counted {totals[group_of].tolist()} values in the "
                f"selected bins but the previous pass counted {self._expected.tolist()}: the "
                "input changed between passes, or a chunk/shard was skipped or repeated"
            )
        shift = self.shift
        for t in range(self._prefix.shape[0]):
            cum = np.cumsum(counts[group_of[t]])
            r = int(self._rank_left[t])
            d = int(np.searchsorted(cum, r, side="right"))
            below = int(cum[d - 1]) if d > 0 else 0
            self._rank_left[t] = r - below
            self._expected[t] = cum[d] - below
            self._prefix[t] = self._prefix[t] | np.uint64(d << shift)
        self.pass_index += 1
        self.prefixes = np.unique(self._prefix)

    def _start(self, n: int, n_nan: int) -> None:
        self.n, self.n_nan = n, n_nan
        if n == 0 and self.empty_ok:
            self.ranks = self._rank_left = np.zeros(0, np.int64)
            self._prefix = np.zeros(0, np.uint64)
            self._expected = np.zeros(0, np.int64)
            return
        if n == 0:
            what = "the input is empty" if n_nan == 0 else f"all {n_nan} values are NaN"
            raise DataError(
                f"cannot select order statistics: {what}; expected at least one non-NaN "
                "value (NaN scores are excluded from the statistics)"
            )
        ranks = self._ranks_arg(n) if callable(self._ranks_arg) else self._ranks_arg
        ranks_arr = np.asarray(ranks)
        if ranks_arr.ndim != 1 or ranks_arr.size == 0 or ranks_arr.dtype.kind not in "iu":
            raise ConfigError(
                f"ranks must be a non-empty 1-D sequence of integers; received {ranks!r}"
            )
        if (ranks_arr < 0).any() or (ranks_arr >= n).any():
            raise ConfigError(
                f"ranks must lie in [0, {n}) (the number of non-NaN values); received "
                f"{ranks_arr.tolist()}"
            )
        self.ranks = ranks_arr.astype(np.int64)
        self._rank_left = self.ranks.copy()
        self._prefix = np.zeros(self.ranks.shape[0], np.uint64)
        self._expected = np.full(self.ranks.shape[0], n, np.int64)

    def result(self) -> np.ndarray:
        """The selected values, in the order of ``ranks``, as an array of ``dtype``."""
        if not self.done:
            raise FFEngineError(
                f"selection unfinished: {self.pass_index} of {self.n_passes} passes done"
            )
        return keys_to_floats(self._prefix, self.dtype)

    def _check_not_done(self) -> None:
        if self.done:
            raise FFEngineError("selection already finished; call result()")


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------
ScoresLike = np.ndarray | str | os.PathLike


class ScoreSource:
    """A 1-D array of scores (in memory, memmapped, or a ``.npy`` path) read in chunks.

    ``dtype`` is the working dtype: float32/float64 as stored; integers and bools are
    converted to float64 and float16 to float32, one chunk at a time. A path is opened with
    ``np.load(mmap_mode="r")``; after each chunk of a read-only memmap the pages are
    released (``MADV_DONTNEED``) so resident memory stays about one chunk.
    """

    def __init__(self, x: ScoresLike | Sequence[float]):
        self.path: Path | None = None
        if isinstance(x, (str, os.PathLike)):
            self.path = Path(x)
            try:
                arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError as e:
                raise DataError(f"score file not found: {self.path}") from e
            except (ValueError, OSError) as e:
                raise DataError(
                    f"cannot read {self.path} as a .npy array ({e}); expected a 1-D float "
                    "array saved with numpy.save"
                ) from e
            if not isinstance(arr, np.ndarray):
                raise DataError(f"{self.path} is an .npz archive; expected a single .npy array")
        else:
            arr = x if isinstance(x, np.ndarray) else np.asarray(x)
        if arr.ndim != 1:
            raise DataError(f"scores must be a 1-D array; received shape {arr.shape}")
        kind, size = arr.dtype.kind, arr.dtype.itemsize
        if kind == "f" and size in (4, 8):
            work = np.dtype(f"f{size}")
        elif kind == "f" and size == 2:
            work = np.dtype(np.float32)
        elif kind in "iub":
            work = np.dtype(np.float64)
        else:
            raise DataError(
                f"scores must be real numbers (float32/float64, or integers); received "
                f"dtype {arr.dtype}"
            )
        self.array = arr
        self.dtype = work
        self.n_total = int(arr.shape[0])
        self._release = (
            isinstance(arr, np.memmap)
            and getattr(arr, "mode", None) == "r"
            and hasattr(mmap, "MADV_DONTNEED")
            and isinstance(getattr(arr, "_mmap", None), mmap.mmap)
        )

    def chunks(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(offset, chunk)``: contiguous native ``dtype`` slices of ``chunk_size``."""
        if int(chunk_size) < 1:
            raise ConfigError(f"chunk_size must be >= 1; received {chunk_size}")
        chunk_size = int(chunk_size)
        for start in range(0, self.n_total, chunk_size):
            view = np.asarray(self.array[start : start + chunk_size])
            yield start, np.ascontiguousarray(view.astype(self.dtype, copy=False))
            if self._release:
                with contextlib.suppress(OSError, ValueError):
                    self.array._mmap.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.array = None  # drop our reference; the mapping closes with its last view

    def __enter__(self) -> ScoreSource:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            self.close()


def open_scores(
    x: ScoresLike | ScoreSource | Sequence[float],
) -> contextlib.AbstractContextManager[ScoreSource]:
    """Context manager giving a :class:`ScoreSource` for an array, memmap or ``.npy`` path.

    A :class:`ScoreSource` passed in is handed through and left open (its owner closes it).
    """
    return contextlib.nullcontext(x) if isinstance(x, ScoreSource) else ScoreSource(x)


def run_selection(
    chunks: Callable[[], Iterable[np.ndarray]],
    dtype: np.dtype | type,
    ranks: RanksArg,
    *,
    parallel: bool | None = None,
    empty_ok: bool = False,
    allreduce: Callable[[np.ndarray], np.ndarray] | None = None,
) -> RadixSelector:
    """Drive a :class:`RadixSelector` to completion; ``chunks()`` must replay the same data.

    ``allreduce`` makes the selection span several processes that each hold one shard of
    the values: it receives this process's histogram of a pass and must return the sum over
    all processes (e.g. ``torch.distributed.all_reduce`` with ``SUM``); every process then
    advances with the same total and ends with the same exact result. ``chunks()`` yields
    only the local shard, which may be empty.

    Returns the finished selector (``.result()``, ``.n``, ``.n_nan``, ``.passes_done``).
    """
    sel = RadixSelector(dtype, ranks, parallel=parallel, empty_ok=empty_ok)
    while not sel.done:
        hist = sel.empty_histogram()
        for chunk in chunks():
            sel.histogram(chunk, out=hist)
        if allreduce is not None:
            hist = allreduce(hist)
        sel.advance(hist)
    return sel


def kth_smallest(
    x: ScoresLike | ScoreSource | Sequence[float],
    ks: int | Sequence[int],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    parallel: bool | None = None,
) -> np.generic | np.ndarray:
    """Exact ``ks``-th smallest non-NaN values (0-based) of a 1-D array or ``.npy`` file.

    Equals ``np.sort(x[~isnan(x)])[ks]`` (with ``-0.0`` returned as ``+0.0``). A scalar
    ``ks`` gives a numpy scalar, a sequence an array of the working dtype (see
    :class:`ScoreSource`). Raises :class:`DataError` for an empty or all-NaN input and
    :class:`ConfigError` for a rank outside ``[0, n_non_nan)``.
    """
    scalar = np.ndim(ks) == 0
    ranks = np.atleast_1d(np.asarray(ks))
    with open_scores(x) as src:
        sel = run_selection(lambda: (c for _, c in src.chunks(chunk_size)), src.dtype, ranks,
                            parallel=parallel)
    values = sel.result()
    return values[0] if scalar else values
