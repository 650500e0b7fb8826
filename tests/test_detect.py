"""Exact streaming median / MAD / flagging against numpy, bit for bit."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ffengine.detect import (
    MADStats,
    RadixSelector,
    ScoreSource,
    flag,
    float_keys,
    keys_to_floats,
    kth_smallest,
    median_mad,
    median_ranks,
    robust_stats,
    threshold,
)
from ffengine.detect.select import RADIX
from ffengine.errors import ConfigError, DataError, FFEngineError

DTYPES = [np.float32, np.float64]


@pytest.fixture
def np_rng() -> np.random.Generator:
    """Seeded numpy generator (conftest's ``rng`` is a torch generator)."""
    return np.random.default_rng(20240611)


def _special(dtype) -> list[float]:
    info = np.finfo(dtype)
    return [0.0, -0.0, 1.0, -1.0, 2.5, np.inf, -np.inf, np.nan, float(info.smallest_subnormal),
            -float(info.smallest_subnormal), float(info.max), -float(info.max),
            float(info.smallest_normal)]


@st.composite
def score_arrays(draw, min_size: int = 0, max_size: int = 200):
    """Float32/float64 arrays mixing arbitrary floats with a pool of repeated specials."""
    dtype = draw(st.sampled_from(DTYPES))
    width = 32 if dtype == np.float32 else 64
    pool = draw(st.lists(st.floats(width=width, allow_nan=False), min_size=1, max_size=4))
    elements = st.one_of(
        st.floats(width=width, allow_nan=True, allow_infinity=True, allow_subnormal=True),
        st.sampled_from(_special(dtype)),
        st.sampled_from(pool),  # many duplicates
    )
    n = draw(st.integers(min_size, max_size))
    return draw(arrays(dtype, n, elements=elements))


def _numpy_reference(x: np.ndarray):
    x = x[~np.isnan(x)]
    with np.errstate(invalid="ignore", over="ignore"):
        med = np.median(x)
        mad = np.median(np.abs(x - med))
    return med, mad


def _same(ours, ref) -> bool:
    """Equal value and dtype; NaN matches NaN; -0.0 matches +0.0 (ours is always +0.0)."""
    if np.asarray(ours).dtype != np.asarray(ref).dtype:
        return False
    if np.isnan(ref):
        return bool(np.isnan(ours))
    if ours == 0:
        return ref == 0 and not np.signbit(ours)
    return ours.tobytes() == ref.tobytes()


# ---------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_keys_preserve_order_and_round_trip(dtype, np_rng):
    x = np.concatenate([
        np_rng.standard_normal(1000).astype(dtype) * dtype(1e3),
        np.array([s for s in _special(dtype) if not np.isnan(s)], dtype),
    ])
    k = float_keys(x)
    assert k.dtype == (np.uint32 if dtype == np.float32 else np.uint64)
    xs, ks = x[np.argsort(x, kind="stable")], k[np.argsort(x, kind="stable")]
    assert np.array_equal(xs[1:] > xs[:-1], ks[1:] > ks[:-1])
    assert np.array_equal(xs[1:] == xs[:-1], ks[1:] == ks[:-1])
    assert np.array_equal(np.sort(k), float_keys(np.sort(x)))
    back = keys_to_floats(k, dtype)
    canon = np.where(x == 0, dtype(0), x)
    assert back.tobytes() == canon.tobytes()
    assert float_keys(np.array([-0.0], dtype))[0] == float_keys(np.array([0.0], dtype))[0]


# ---------------------------------------------------------------------------------------
# median / MAD vs numpy
# ---------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(x=score_arrays(), chunk=st.sampled_from([1, 3, 7, 64, 1 << 22]))
# the mean of the middle values -smallest_subnormal and 0 rounds to -0.0 (returned as +0.0)
@example(x=np.array([-np.finfo(np.float32).smallest_subnormal, 0.0], np.float32), chunk=1)
@example(x=np.array([0.0, -np.finfo(np.float64).smallest_subnormal], np.float64), chunk=7)
def test_median_mad_matches_numpy(x, chunk):
    n_nan = int(np.isnan(x).sum())
    if n_nan == x.shape[0]:
        with pytest.raises(DataError):
            median_mad(x, chunk_size=chunk)
        return
    med, mad, got_nan = median_mad(x, chunk_size=chunk, return_nan_count=True)
    ref_med, ref_mad = _numpy_reference(x)
    assert _same(med, ref_med), (med, ref_med)
    assert _same(mad, ref_mad), (mad, ref_mad)
    assert got_nan == n_nan


@settings(max_examples=100, deadline=None)
@given(x=score_arrays(min_size=1, max_size=120), chunk=st.sampled_from([2, 5, 1 << 22]),
       k=st.sampled_from([0.0, 1.0, 2.5, 3.0, 10.0]))
def test_flag_matches_numpy(x, chunk, k):
    if np.isnan(x).all():
        return
    med, mad = _numpy_reference(x)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = np.flatnonzero(x > med + k * mad)
    got = flag(x, k, chunk_size=chunk)
    assert got.dtype == np.int64
    assert np.array_equal(got, ref)
    assert not np.isnan(x[got]).any()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=score_arrays(min_size=1, max_size=150), chunk=st.sampled_from([1, 4, 33]))
def test_memmapped_file_multi_chunk(x, chunk, tmp_path):
    if np.isnan(x).all():
        return
    path = tmp_path / "scores.npy"
    np.save(path, x)
    ref_med, ref_mad = _numpy_reference(x)
    for src in (str(path), path, np.load(path, mmap_mode="r")):
        s = robust_stats(src, chunk_size=chunk)
        assert _same(s.median, ref_med) and _same(s.mad, ref_mad)
        assert s.n + s.n_nan == x.shape[0]
    out = flag(path, 3.0, out=tmp_path / "flags.npy", chunk_size=chunk)
    assert out == tmp_path / "flags.npy"
    assert np.array_equal(np.load(out), flag(x, 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flags.npy", "scores.npy"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 1001, 1002])
def test_small_and_odd_even(dtype, n, np_rng):
    x = (np_rng.integers(-5, 6, n) * 0.5).astype(dtype)  # many ties, negatives and zeros
    med, mad = median_mad(x, chunk_size=3)
    ref_med, ref_mad = _numpy_reference(x)
    assert _same(med, ref_med) and _same(mad, ref_mad)
    assert isinstance(med, dtype) and isinstance(mad, dtype)


def test_float32_mean_of_middle_values_overflows_like_numpy():
    big = np.finfo(np.float32).max
    x = np.array([big, big, big, big], np.float32)
    with np.errstate(over="ignore"):
        ref = np.median(x)
    assert _same(median_mad(x)[0], ref)  # (max + max) / 2 overflows to inf in float32
    x = np.array([-np.inf, np.inf], np.float64)
    med, mad = median_mad(x)
    assert np.isnan(med) and np.isnan(mad)
    assert flag(x).size == 0


def test_large_multichunk_parallel_and_serial_agree(np_rng):
    x = np_rng.standard_normal(300_001).astype(np.float32)
    x[::97] = np.nan
    ref_med, ref_mad = _numpy_reference(x)
    for parallel in (True, False):
        s = robust_stats(x, chunk_size=70_000, parallel=parallel)
        assert _same(s.median, ref_med) and _same(s.mad, ref_mad)
        assert s.n_nan == int(np.isnan(x).sum()) and s.passes == 4


def test_integer_and_float16_inputs(np_rng):
    xi = np_rng.integers(-1000, 1000, 501)
    med, mad = median_mad(xi)
    assert isinstance(med, np.float64)
    assert _same(med, np.median(xi.astype(np.float64)))
    assert _same(mad, np.median(np.abs(xi - np.median(xi))))
    xh = np_rng.standard_normal(100).astype(np.float16)
    med, mad = median_mad(xh)
    assert _same(med, _numpy_reference(xh.astype(np.float32))[0])
    assert robust_stats(xh).passes == 4


def test_stats_dataclass_and_threshold(np_rng):
    x = np_rng.standard_normal(1000)
    s = robust_stats(x)
    assert isinstance(s, MADStats) and s.n == 1000 and s.n_nan == 0 and s.passes == 8
    assert _same(threshold(x, 2.0), s.median + 2.0 * s.mad)
    assert threshold(x, 0.0) == s.median


# ---------------------------------------------------------------------------------------
# kth_smallest and the sharded state machine
# ---------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(x=score_arrays(min_size=1), data=st.data())
def test_kth_smallest_matches_sort(x, data):
    clean = np.sort(x[~np.isnan(x)])
    if clean.size == 0:
        return
    ks = data.draw(st.lists(st.integers(0, clean.size - 1), min_size=1, max_size=4))
    got = kth_smallest(x, ks, chunk_size=data.draw(st.sampled_from([1, 8, 1 << 22])))
    assert got.dtype == x.dtype
    assert np.array_equal(got, clean[ks])
    assert not np.signbit(got[got == 0]).any()
    assert kth_smallest(x, ks[0]) == clean[ks[0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sharded_histograms_add_up(dtype, np_rng):
    x = np.round(np_rng.standard_normal(5000) * 4).astype(dtype)  # heavy ties
    shards = np.array_split(x, 3)
    ranks = [0, 17, 2499, 2500, 4999]
    sel = RadixSelector(dtype, ranks)
    while not sel.done:
        # One histogram per "process", summed as an all-reduce would.
        total = sum(sel.histogram(s) for s in shards)
        sel.advance(total)
    assert np.array_equal(sel.result(), np.sort(x)[ranks])
    assert sel.n == 5000 and sel.n_nan == 0 and sel.pass_index == sel.n_passes


def test_changed_input_between_passes_is_detected(np_rng):
    x = np_rng.standard_normal(1000).astype(np.float32)
    sel = RadixSelector(np.float32, median_ranks)
    sel.advance(sel.histogram(x))
    with pytest.raises(DataError, match="changed between passes"):
        # drop the median itself: its bin then holds one value fewer than pass 0 counted
        sel.advance(sel.histogram(np.delete(x, np.argsort(x)[499])))


def test_selector_misuse():
    sel = RadixSelector(np.float64, [0])
    with pytest.raises(FFEngineError, match="unfinished"):
        sel.result()
    with pytest.raises(DataError, match="dtype"):
        sel.histogram(np.zeros(3, np.float32))
    with pytest.raises(ConfigError):
        sel.histogram(np.zeros(3), out=np.zeros((1, RADIX), np.int64))
    with pytest.raises(ConfigError):
        RadixSelector(np.int32, [0])
    with pytest.raises(ConfigError, match=r"\[0, 3\)"):
        kth_smallest(np.arange(3.0), 3)


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------
def test_empty_and_all_nan_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="empty"):
        median_mad(np.zeros(0, np.float32))
    with pytest.raises(DataError, match="all 3 values are NaN"):
        median_mad(np.full(3, np.nan))
    path = tmp_path / "empty.npy"
    np.save(path, np.zeros(0))
    with pytest.raises(DataError):
        flag(path)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="k must be >= 0"):
        flag(np.arange(5.0), k=-1.0)
    with pytest.raises(ConfigError):
        threshold(np.arange(5.0), k=float("nan"))
    with pytest.raises(DataError, match="1-D"):
        median_mad(np.zeros((2, 2)))
    with pytest.raises(DataError, match="not found"):
        median_mad(tmp_path / "missing.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an npy file")
    with pytest.raises(DataError, match="cannot read"):
        median_mad(tmp_path / "junk.npy")
    with pytest.raises(DataError, match="real numbers"):
        median_mad(np.array(["a", "b"]))
    with pytest.raises(ConfigError, match="chunk_size"):
        median_mad(np.arange(3.0), chunk_size=0)


def test_score_source_passed_through_stays_open(tmp_path, np_rng):
    path = tmp_path / "s.npy"
    np.save(path, np_rng.standard_normal(50))
    with ScoreSource(path) as src:
        s = robust_stats(src, chunk_size=7)
        idx = flag(src, 1.0, stats=s, chunk_size=7)
        assert src.array is not None
    x = np.load(path)
    assert np.array_equal(idx, flag(x, 1.0))


def test_big_endian_and_strided_inputs(np_rng):
    x = np_rng.standard_normal(999)
    be = x.astype(">f8")
    strided = np.repeat(x, 2)[::2]
    for v in (be, strided):
        med, mad = median_mad(v, chunk_size=100)
        assert _same(med, _numpy_reference(x)[0]) and _same(mad, _numpy_reference(x)[1])


def test_temporary_directory_memmap_release():
    # A read-only memmap is released chunk by chunk; results must still be exact.
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.npy"
        x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
        np.save(p, x)
        mm = np.load(p, mmap_mode="r")
        s = robust_stats(mm, chunk_size=1000)
        assert _same(s.median, _numpy_reference(x)[0])
        assert np.array_equal(mm[:10], x[:10])  # pages fault back in after release
        del mm


# ---------------------------------------------------------------------------------------
# sharded selection: histograms all-reduced across processes (here: threads)
# ---------------------------------------------------------------------------------------
class _ThreadAllReduce:
    """An all-reduce (SUM) among ``n`` threads, standing in for torch.distributed."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: list[np.ndarray | None] = [None] * n

    def of_rank(self, r: int):
        def allreduce(hist: np.ndarray) -> np.ndarray:
            self.slots[r] = hist.copy()
            self.barrier.wait()
            total = np.sum(self.slots, axis=0)
            self.barrier.wait()  # every rank has read the slots before any is overwritten
            return total

        return allreduce


def _sharded_stats(shards: list[np.ndarray], chunk: int) -> list:
    """robust_stats of each shard in its own thread, histograms all-reduced; per rank the
    MADStats or the exception raised."""
    comm = _ThreadAllReduce(len(shards))
    results: list = [None] * len(shards)

    def work(r: int) -> None:
        try:
            results[r] = robust_stats(shards[r], chunk_size=chunk, allreduce=comm.of_rank(r))
        except Exception as e:  # handed to the test thread
            results[r] = e

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@settings(max_examples=60, deadline=None)
@given(x=score_arrays(max_size=150), data=st.data())
def test_sharded_robust_stats_matches_numpy(x, data):
    n_shards = data.draw(st.integers(1, 4))
    cuts = sorted(data.draw(st.lists(st.integers(0, x.shape[0]), min_size=n_shards - 1,
                                     max_size=n_shards - 1)))
    shards = np.split(x, cuts)  # empty shards included
    got = _sharded_stats(shards, data.draw(st.sampled_from([1, 5, 1 << 22])))
    if np.isnan(x).all():
        assert all(isinstance(g, DataError) for g in got)
        return
    ref_med, ref_mad = _numpy_reference(x)
    for s in got:
        assert isinstance(s, MADStats), s
        assert _same(s.median, ref_med) and _same(s.mad, ref_mad)
        assert s.n == int((~np.isnan(x)).sum()) and s.n_nan == int(np.isnan(x).sum())
    # flagging each shard with the shared statistics flags exactly numpy's set
    offsets = np.cumsum([0] + [len(s) for s in shards[:-1]])
    ids = np.concatenate([flag(sh, 3.0, stats=got[r]) + offsets[r]
                          for r, sh in enumerate(shards)])
    with np.errstate(invalid="ignore", over="ignore"):
        assert np.array_equal(ids, np.flatnonzero(x > ref_med + 3.0 * ref_mad))


# ---------------------------------------------------------------------------------------
# the edge cases spelled out (hypothesis draws them too, but not every run)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_zeros_tie_and_come_back_positive(dtype):
    for x in ([-0.0], [-0.0, 0.0, -0.0], [-0.0, -0.0, 1.0, -1.0], [0.0, -0.0]):
        a = np.array(x, dtype)
        med, mad = median_mad(a)
        assert med == 0 and not np.signbit(med) and isinstance(med, dtype)
        assert _same(mad, _numpy_reference(a)[1])
        assert not np.signbit(kth_smallest(a, int((a < 0).sum())))  # a zero
    assert flag(np.array([-0.0, 0.0, -0.0, 1.0], dtype), 3.0).tolist() == [3]


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_scores_are_exact(dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    x = (np.arange(-7, 12) * tiny).astype(dtype)  # all subnormal (or zero)
    x = np.concatenate([x, x[:5]])  # ties
    ref_med, ref_mad = _numpy_reference(x)
    med, mad = median_mad(x, chunk_size=4)
    assert _same(med, ref_med) and _same(mad, ref_mad)
    assert mad > 0  # the MAD of subnormals is not flushed to zero
    with np.errstate(invalid="ignore", over="ignore"):
        assert np.array_equal(flag(x, 1.0), np.flatnonzero(x > ref_med + 1.0 * ref_mad))


def test_nan_policy_is_reported_and_never_flagged(tmp_path):
    x = np.array([np.nan, 1.0, 2.0, np.nan, 3.0, 100.0, np.nan], np.float32)
    s = robust_stats(x)
    assert (s.n, s.n_nan) == (4, 3)
    assert _same(s.median, np.float32(2.5)) and _same(s.mad, np.float32(1.0))
    np.save(tmp_path / "s.npy", x)
    out = flag(tmp_path / "s.npy", 0.0, out=tmp_path / "f.npy")
    assert np.load(out).tolist() == [4, 5]  # NaN > threshold is False
    with pytest.raises(DataError, match="all 2 values are NaN"):
        flag(np.full(2, np.nan, np.float32))
