"""Otsu's split of a flagged set (ffengine.detect.split) against a brute-force search over
every cut, on fresh random inputs; the trace option that applies it (``threshold``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ffengine.detect import flag
from ffengine.detect.split import (
    OTSU_MIN_ETA,
    otsu_split,
    refine_by_split,
    refine_flagged_file,
)


def _brute_force_otsu(x):
    """Every cut between consecutive sorted values, the group variances computed directly."""
    x = np.sort(np.asarray(x, np.float64))
    best = (-1.0, None)
    for i in range(1, len(x)):
        lo, hi = x[:i], x[i:]
        between = len(lo) * len(hi) / len(x) ** 2 * (lo.mean() - hi.mean()) ** 2
        if between > best[0]:
            best = (between, (x[i - 1] + x[i]) / 2)
    return best[1], best[0] / x.var()


@pytest.mark.parametrize("seed", range(6))
def test_otsu_split_matches_a_brute_force_search(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0, 1, 200 + seed * 37), rng.normal(4, 0.5, 40 + seed)])
    if seed % 2:  # float32 scores, as the engine writes them
        x = x.astype(np.float32)
    thr, eta = otsu_split(rng.permutation(x))
    ref_thr, ref_eta = _brute_force_otsu(x)
    assert thr == pytest.approx(ref_thr, rel=1e-12) and eta == pytest.approx(ref_eta, rel=1e-9)
    assert 0.0 < eta < 1.0


def test_otsu_split_of_two_values_and_of_inputs_it_cannot_split():
    assert otsu_split(np.array([1.0, 3.0])) == (2.0, 1.0)
    assert otsu_split(np.full(5, 2.0)) == (2.0, 0.0)
    assert otsu_split(np.array([1.0])) == (1.0, 0.0)
    assert otsu_split(np.array([])) == (np.inf, 0.0)


@pytest.mark.parametrize("seed", range(4))
def test_refine_by_split_keeps_the_upper_group_of_a_clear_split_only(seed):
    rng = np.random.default_rng(100 + seed)
    clean = rng.standard_normal(5000)
    tail = rng.uniform(6.5, 9.0, 200) * 0.6745  # just above k = 6 (MAD units of a normal)
    poisons = rng.normal(30.0, 1.0, 300) * 0.6745  # far above it
    x = rng.permutation(np.concatenate([clean, tail, poisons]))
    flagged = flag(x, 6.0)
    kept, split = refine_by_split(x, flagged)
    ref_thr, ref_eta = _brute_force_otsu(x[flagged])
    assert split.applied and split.eta > OTSU_MIN_ETA
    assert split.eta == pytest.approx(ref_eta, rel=1e-9)
    # the reference: every flagged id whose score is above the brute-force cut
    np.testing.assert_array_equal(kept, flagged[x[flagged] > ref_thr])
    assert set(np.flatnonzero(x > 20.0 * 0.6745)) == set(kept)

    # one blob above the threshold: no clear split, the flags stay
    # (a tail that thins out upwards: Otsu's η of an exponential is about 0.65, of a uniform
    # about 0.75, of two separate clusters near 1)
    blob = np.concatenate([clean, (6.5 + rng.exponential(1.0, 400)) * 0.6745])
    flagged = flag(blob, 6.0)
    kept, split = refine_by_split(blob, flagged)
    assert not split.applied and 0 < split.eta < OTSU_MIN_ETA
    np.testing.assert_array_equal(kept, flagged)
    # the ungated split (min_eta 0) cuts it anyway
    assert len(refine_by_split(blob, flagged, 0.0)[0]) < len(flagged)


def test_refine_by_split_never_drops_a_set_it_cannot_split():
    x = np.concatenate([np.random.default_rng(1).standard_normal(1000), np.full(20, 50.0)])
    flagged = flag(x, 6.0)
    kept, split = refine_by_split(x, flagged, 0.0)  # even ungated
    assert split.eta == 0.0 and not split.applied
    np.testing.assert_array_equal(kept, np.arange(1000, 1020))
    kept, split = refine_by_split(x, np.zeros(0, np.int64), 0.0)
    assert kept.size == 0 and not split.applied
    with pytest.raises(ValueError, match="min_eta"):
        refine_by_split(x, flagged, 1.5)


@pytest.mark.parametrize("min_eta", [None, 0.0, 1.0])
def test_refine_flagged_file_rewrites_the_flags_as_refine_by_split_gives_them(tmp_path, min_eta):
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal(3000), rng.uniform(4.5, 6.0, 100),
                        rng.normal(20.0, 1.0, 150)]).astype(np.float32)
    x = rng.permutation(x)
    np.save(tmp_path / "det.npy", x)
    flag(tmp_path / "det.npy", 6.0, out=tmp_path / "flagged.npy")
    flagged = np.load(tmp_path / "flagged.npy")
    ref, ref_split = refine_by_split(x, flagged, OTSU_MIN_ETA if min_eta is None else min_eta)
    split = refine_flagged_file(tmp_path / "det.npy", tmp_path / "flagged.npy", min_eta)
    assert split == ref_split
    np.testing.assert_array_equal(np.load(tmp_path / "flagged.npy"), ref)
    # 1.0 keeps the flags (η < 1 here), 0.0 always cuts a set it can split
    assert split.applied == (min_eta != 1.0) and (len(ref) < len(flagged)) == split.applied
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left behind


def test_trace_threshold_mad_split_flags_the_refined_set(trace_setup, tmp_path, monkeypatch):
    """``trace(threshold="mad-split")``: the MAD flags refined by Otsu's split of their scores
    where it is clear, recorded in the summary and in the metadata (a directory traced with
    the other rule is refused)."""
    import ffengine.detect.split as split_mod
    import ffengine.trace as trace_mod
    from ffengine.engine.scoring import Engine
    from ffengine.errors import ConfigError, ManifestMismatchError
    from ffengine.trace import trace

    kw = dict(batch_size=8, chunk_batches=1, draws=1, progress=False)
    inst = [trace_setup["instance"]]
    k = 0.5  # a flagged set of tens of samples out of 121 to split
    mad = trace(Engine(trace_setup["run"], **kw), trace_setup["index"], inst, tmp_path / "mad",
                k=k)
    assert mad["threshold_rule"] == "mad" and mad["split"] is None
    det = np.load(tmp_path / "mad" / "detection_scores.npy")
    mad_flags = np.load(tmp_path / "mad" / "flagged.npy")
    np.testing.assert_array_equal(mad_flags, flag(det, k))
    plotted = {}  # scores.png gets Otsu's cut only where the split applied
    real_plot = trace_mod.plot_score_distribution
    monkeypatch.setattr(trace_mod, "plot_score_distribution",
                        lambda *a, **kw: plotted.update(kw) or real_plot(*a, **kw))
    for min_eta in (0.0, 1.0):  # the split applied, then not
        monkeypatch.setattr(split_mod, "OTSU_MIN_ETA", min_eta)
        out = tmp_path / f"split-{min_eta}"
        s = trace(Engine(trace_setup["run"], **kw), trace_setup["index"], inst, out, k=k,
                  threshold="mad-split")
        np.testing.assert_array_equal(np.load(out / "detection_scores.npy"), det)
        ref, ref_split = refine_by_split(det, mad_flags, min_eta)
        np.testing.assert_array_equal(np.load(out / "flagged.npy"), ref)
        assert s["threshold_rule"] == "mad-split" and s["n_flagged"] == len(ref)
        assert s["split"] == {**ref_split.to_dict(), "n_flagged_mad": len(mad_flags)}
        assert s["split"]["applied"] == (min_eta == 0.0) and 0 < s["split"]["eta"] < 1
        assert plotted["cut"] == (s["split"]["threshold"] if min_eta == 0.0 else None)
        meta = json.loads((out / "metadata.json").read_text())
        assert meta["options"]["threshold"] == "mad-split"
        assert sum(r["flagged"] for r in json.loads((out / "domains.json").read_text())) \
            == len(ref)
    assert len(np.load(tmp_path / "split-0.0" / "flagged.npy")) < len(mad_flags)
    # the MAD rule's metadata has no threshold key (results from before the option match)
    assert "threshold" not in json.loads((tmp_path / "mad" / "metadata.json").read_text())[
        "options"]
    with pytest.raises(ManifestMismatchError, match="options.threshold"):
        trace(Engine(trace_setup["run"], **kw), trace_setup["index"], inst, tmp_path / "mad",
              k=k, threshold="mad-split")
    with pytest.raises(ConfigError, match="threshold"):
        trace(Engine(trace_setup["run"], **kw), trace_setup["index"], inst, tmp_path / "x",
              threshold="otsu")
