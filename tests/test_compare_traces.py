"""bench/compare_traces.py: the check that traces on other backends and devices flag the same
ids as a reference trace (run on a lent GPU by bench/gpu_session.sh)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
compare_traces = pytest.importorskip("compare_traces")


def write_trace(path: Path, scores: np.ndarray, flagged, backend: str) -> Path:
    path.mkdir()
    np.save(path / "scores.npy", scores.astype(np.float32))
    np.save(path / "detection_scores.npy", scores.mean(axis=1).astype(np.float32))
    np.save(path / "flagged.npy", np.asarray(flagged, dtype=np.int64))
    (path / "summary.json").write_text(json.dumps({"backend": backend}))
    (path / "metadata.json").write_text(json.dumps({"options": {"device_type": "cuda"}}))
    return path


def test_reports_agreement_differences_and_skips(tmp_path, np_rng, capsys):
    scores = np_rng.standard_normal((50, 3))
    scores[7] = np.nan  # a skipped sample
    ref = write_trace(tmp_path / "ref", scores, [3, 9, 20], "cpu")
    near = scores.copy()
    near[0, 0] += 1e-3 * np.nanmax(np.abs(scores))  # 1e-3 of the largest magnitude
    same = write_trace(tmp_path / "same", near, [20, 3, 9], "triton")  # order is no matter
    other = write_trace(tmp_path / "other", scores, [3, 9, 41, 42], "cuda")
    unskipped = scores.copy()
    unskipped[7] = 0.0
    noskip = write_trace(tmp_path / "noskip", unskipped, [3, 9, 20], "torch")

    res = compare_traces.compare(ref, [same, other, noskip])
    a, b, c = res["traces"]
    assert (a["backend"], a["device"], a["n_flagged"]) == ("triton", "cuda", 3)
    assert a["same_flagged"] and a["same_skipped"]
    assert a["scores_scaled_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert not b["same_flagged"] and (b["only_here"], b["only_in_reference"]) == (2, 1)
    assert c["same_flagged"] and not c["same_skipped"]
    assert not res["all_agree"]

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    res = compare_traces.compare(ref, [unfinished, same])
    assert "summary.json" in res["traces"][0]["error"] and res["traces"][1]["same_flagged"]
    assert not res["all_agree"]

    assert compare_traces.main([str(ref), str(same), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["all_agree"]
    assert compare_traces.main([str(ref), str(other)]) == 1
