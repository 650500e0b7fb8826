"""Resumable, atomic tracing: a trace killed at any point and started again finishes with the
results of an uninterrupted run, bit for bit, scoring no piece twice; a result directory of
other inputs or options is refused before any work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ffengine.engine.instance import Instance
from ffengine.engine.scoring import Engine
from ffengine.engine.store import (
    PARTIAL_DIR,
    ChunkLayout,
    DoneLog,
    RankStore,
    check_metadata,
    metadata_differences,
)
from ffengine.errors import DataError, FFEngineError, ManifestMismatchError
from ffengine.trace import load_results, trace

from .trace_fixture import (
    RESULT_ARRAYS,
    assert_same_results,
    env,
    run_cli,
    shared_reference,
    trace_args,
)

# torch on one thread for every test here; the subprocesses get one thread through env()
pytestmark = pytest.mark.usefixtures("one_thread")


def _summary_without_provenance(s: dict) -> dict:
    """A summary minus what may differ between equal results: how the work was split over
    calls, and decoder messages that quote object addresses."""
    s = {k: v for k, v in s.items() if k != "pieces"}
    s["skipped"] = [{k: v for k, v in row.items() if k != "reason"} for row in s["skipped"]]
    return s


def _n_done(log: Path) -> int:
    try:
        return log.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------------------------------
# a real process, killed with SIGKILL
# ---------------------------------------------------------------------------------------
def test_sigkill_then_resume_is_bit_identical_and_scores_no_piece_twice(
        trace_setup, tmp_path_factory, tmp_path):
    ref = shared_reference(tmp_path_factory, trace_setup)
    ref_summary = json.loads((ref / "summary.json").read_text())
    total = ref_summary["pieces"]["total"]
    assert total == 2 * 31  # checkpoints x chunks of 4: many pieces to be killed among

    out = tmp_path / "killed"
    log = out / PARTIAL_DIR / "done-rank0.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "ffengine", *trace_args(trace_setup, out)],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while _n_done(log) < 3:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"trace ended (rc {proc.returncode}) before it could be killed: "
                        f"{proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stderr.close()

    first = DoneLog(log, writable=False).done
    assert 3 <= len(first) < total
    assert len({rec["pid"] for rec in first.values()}) == 1
    assert not (out / "summary.json").exists()
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["metadata.json", PARTIAL_DIR]  # no result file before the end
    with pytest.raises(DataError, match="resume"):
        load_results(out)

    # Other options: refused before any work, naming the key, both values and the path.
    before = {p.name: p.read_bytes() for p in (out / PARTIAL_DIR).iterdir()}
    r = run_cli(trace_args(trace_setup, out, "--seed", "1"))
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1
    assert "options.seed = 0" in err[0] and "options.seed = 1" in err[0]
    assert str(out / "metadata.json") in err[0]
    assert {p.name: p.read_bytes() for p in (out / PARTIAL_DIR).iterdir()} == before

    # The same arguments: only the missing pieces are scored.
    r = run_cli(trace_args(trace_setup, out))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["pieces"] == {"total": total, "done_before": len(first),
                                 "scored": total - len(first)}
    assert_same_results(out, ref)
    assert _summary_without_provenance(summary) == _summary_without_provenance(ref_summary)
    assert json.loads((out / "summary.json").read_text()) == summary
    leftovers = sorted(p.name for p in out.iterdir()
                       if p.name.startswith(".") or p.name == PARTIAL_DIR)
    assert leftovers == []

    # Started again on the finished directory: nothing to do, the same summary.
    r = run_cli(trace_args(trace_setup, out))
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1]) == summary


# ---------------------------------------------------------------------------------------
# in-process interruptions at chosen points
# ---------------------------------------------------------------------------------------
KW = dict(batch_size=8, chunk_batches=1, draws=1, progress=False)


def _trace(trace_setup, out, **kw):
    engine = Engine(trace_setup["run"], **{**KW, **kw})
    return trace(engine, trace_setup["index"], [trace_setup["instance"]], out,
                 instance_paths=["inst"])


@pytest.fixture(scope="module")
def straight(trace_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, _trace(trace_setup, out)


class Crash(Exception):
    """Stands for the process dying at this point."""


def test_engine_score_and_trace_share_the_piece_scorer(trace_setup, straight):
    out, _ = straight
    res = Engine(trace_setup["run"], **KW).score(trace_setup["index"], [trace_setup["instance"]])
    assert np.array_equal(np.load(out / "terms.npy"), res.terms)
    assert np.array_equal(np.load(out / "scores.npy"), res.scores, equal_nan=True)
    det = np.load(out / "detection_scores.npy")
    assert np.array_equal(det, res.detection_scores, equal_nan=True)
    bad = [i for i, _ in res.skipped]
    assert bad == [37] and np.isnan(det[bad]).all() and not np.isnan(np.delete(det, bad)).any()
    assert not np.isin(np.load(out / "flagged.npy"), bad).any()
    # the undecodable sample leaves its domain's total (it could not be flagged)
    rows = json.loads((out / "domains.json").read_text())
    dom = trace_setup["index"].domains
    for r in rows:
        d = trace_setup["index"].domain_names.index(r["domain"])
        n_bad = int(np.isin(np.flatnonzero(dom == d), bad).sum())
        assert (r["total"], r["skipped"]) == (int((dom == d).sum()) - n_bad, n_bad)
    assert sum(r["skipped"] for r in rows) == 1


@pytest.mark.parametrize("crash_after", [1, 17])
def test_crash_between_pieces_then_resume(trace_setup, straight, tmp_path, monkeypatch,
                                          crash_after):
    out = tmp_path / "t"
    real = RankStore.write_piece
    calls = []

    def dying(self, *a, **k):
        if len(calls) == crash_after:
            raise Crash
        calls.append(a[:2])
        return real(self, *a, **k)

    monkeypatch.setattr(RankStore, "write_piece", dying)
    with pytest.raises(Crash):
        _trace(trace_setup, out)
    monkeypatch.setattr(RankStore, "write_piece", real)
    summary = _trace(trace_setup, out)
    total = straight[1]["pieces"]["total"]
    assert summary["pieces"] == {"total": total, "done_before": crash_after,
                                 "scored": total - crash_after}
    assert_same_results(out, straight[0])


def test_a_resume_left_to_auto_keeps_the_backend_the_trace_began_with(
        trace_setup, tmp_path, monkeypatch, ext):
    """auto's choice may change between the interrupted call and the resume (here: a trace
    begun on the torch backend, auto now taking the compiled op); the resume keeps the
    backend recorded in the directory, where a backend named explicitly must match it."""
    out = tmp_path / "t"
    real = RankStore.write_piece
    calls = []

    def dying(self, *a, **k):
        if len(calls) == 3:
            raise Crash
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(RankStore, "write_piece", dying)
    with pytest.raises(Crash):
        _trace(trace_setup, out, backend="torch")
    monkeypatch.setattr(RankStore, "write_piece", real)
    assert Engine(trace_setup["run"], **KW).backend == "cpu"  # auto's choice now
    with pytest.raises(ManifestMismatchError, match="options.backend = 'torch'.*'cpu'"):
        _trace(trace_setup, out, backend="cpu")
    monkeypatch.setenv("FFENGINE_BACKEND", "cpu")  # named through the environment: the same
    with pytest.raises(ManifestMismatchError, match="options.backend = 'torch'.*'cpu'"):
        _trace(trace_setup, out)
    monkeypatch.delenv("FFENGINE_BACKEND")
    summary = _trace(trace_setup, out)  # left to auto
    assert summary["backend"] == "torch" and summary["pieces"]["done_before"] == 3
    torch_straight = _trace(trace_setup, tmp_path / "straight", backend="torch")
    assert_same_results(out, tmp_path / "straight")
    assert torch_straight["backend"] == "torch"


def test_crash_after_terms_before_record_rescores_that_piece(trace_setup, straight, tmp_path,
                                                             monkeypatch):
    out = tmp_path / "t"
    real = DoneLog.record
    n = []

    def dying(self, t, chunk, skipped):
        if len(n) == 5:  # the piece's terms are already flushed: a torn write of the record
            os.write(self._fd, json.dumps({"t": t, "chunk": chunk})[:9].encode())
            raise Crash
        n.append(1)
        return real(self, t, chunk, skipped)

    monkeypatch.setattr(DoneLog, "record", dying)
    with pytest.raises(Crash):
        _trace(trace_setup, out)
    monkeypatch.setattr(DoneLog, "record", real)
    assert not (out / PARTIAL_DIR / "done-rank0.jsonl").read_bytes().endswith(b"\n")
    summary = _trace(trace_setup, out)
    assert summary["pieces"]["done_before"] == 5
    assert_same_results(out, straight[0])


def test_crash_while_writing_the_report_then_resume(trace_setup, straight, tmp_path, monkeypatch):
    out = tmp_path / "t"

    def dying(*a, **k):
        raise Crash

    monkeypatch.setattr("ffengine.trace.plot_score_distribution", dying)
    with pytest.raises(Crash):
        _trace(trace_setup, out)
    assert (out / "terms.npy").exists() and not (out / "summary.json").exists()
    monkeypatch.undo()
    monkeypatch.setattr(Engine, "score_piece", lambda *a, **k: pytest.fail("rescored"))
    summary = _trace(trace_setup, out)
    assert summary["pieces"]["scored"] == 0
    assert_same_results(out, straight[0])
    assert not (out / PARTIAL_DIR).exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_finished_directory_returns_its_summary_without_work(trace_setup, straight, monkeypatch):
    out, summary = straight
    monkeypatch.setattr(Engine, "prepare", lambda *a, **k: pytest.fail("worked again"))
    assert _trace(trace_setup, out) == summary


# ---------------------------------------------------------------------------------------
# refusing other inputs
# ---------------------------------------------------------------------------------------
def test_mismatches_are_refused_before_any_work(trace_setup, straight, tmp_path, monkeypatch):
    out, _ = straight
    monkeypatch.setattr(Engine, "prepare", lambda *a, **k: pytest.fail("work started"))
    meta = out / "metadata.json"
    before = meta.read_bytes()
    engine = Engine(trace_setup["run"], **KW)
    cases = [
        (dict(k=2.0), "options.k = 3.0.*options.k = 2.0"),
        (dict(kw=dict(aggregate="max")), "options.aggregate = 'mean'.*'max'"),
        (dict(kw=dict(draws=2)), "options.draws = 1.*options.draws = 2"),
        (dict(kw=dict(chunk_batches=2)), "options.chunk_batches = 1.*= 2"),
        (dict(kw=dict(checkpoints="last")), r"options.checkpoints = \[1, 2\].*= \[2\]"),
        (dict(inst=Instance(trace_setup["instance"].x_r, trace_setup["instance"].x_b)),
         r"instances\[0\].sha256"),
    ]
    for case, pattern in cases:
        e = Engine(trace_setup["run"], **{**KW, **case.get("kw", {})})
        inst = case.get("inst", trace_setup["instance"])
        with pytest.raises(ManifestMismatchError, match=pattern) as info:
            trace(e, trace_setup["index"], [inst], out, k=case.get("k", 3.0))
        assert str(meta) in str(info.value)
    assert meta.read_bytes() == before

    # a checkpoint whose weights changed, in a copy of the run
    run2 = tmp_path / "run"
    shutil.copytree(trace_setup["run"].path, run2)
    w = run2 / "ckpt-0002.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(ManifestMismatchError, match=r"checkpoints\[1\].sha256 = '[0-9a-f]{64}'"):
        trace(Engine(run2, **KW), trace_setup["index"], [trace_setup["instance"]], out)
    # an index other than the run's (checked against the run manifest, before anything)
    other = shutil.copytree(trace_setup["root"] / "index", tmp_path / "index")
    m = json.loads((other / "metadata.json").read_text())
    m["hash"] = "0" * 64
    (other / "metadata.json").write_text(json.dumps(m))
    from ffengine.data.index import SampleIndex

    with pytest.raises(ManifestMismatchError, match="hash"):
        trace(engine, SampleIndex(other), [trace_setup["instance"]], out)


def test_moving_inputs_is_not_a_mismatch(trace_setup, straight):
    meta = json.loads((straight[0] / "metadata.json").read_text())
    moved = json.loads(json.dumps(meta))
    moved["run"]["path"] = "/elsewhere/run"
    moved["index"]["path"] = "/elsewhere/index"
    moved["instances"][0]["path"] = "/elsewhere/instance"
    moved["ffengine"] = "9.9"
    assert metadata_differences(meta, moved) == []
    moved["options"]["world_size"] = 2
    with pytest.raises(ManifestMismatchError, match="same number of processes"):
        check_metadata(Path("m.json"), meta, moved)
    with pytest.raises(ManifestMismatchError, match="format version"):
        check_metadata(Path("m.json"), {"options": {}}, meta)


def test_foreign_partial_directory_is_not_touched(trace_setup, tmp_path):
    out = tmp_path / "t"
    (out / PARTIAL_DIR).mkdir(parents=True)
    (out / PARTIAL_DIR / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="not the work of an ffengine trace"):
        _trace(trace_setup, out)
    assert (out / PARTIAL_DIR / "mine.txt").read_text() == "user data"


# ---------------------------------------------------------------------------------------
# the store's parts
# ---------------------------------------------------------------------------------------
def test_done_log_repairs_a_torn_line_and_rejects_damage(tmp_path):
    p = tmp_path / "done.jsonl"
    log = DoneLog(p)
    log.record(0, 3, [(7, "bad")])
    log.close()
    with open(p, "ab") as f:
        f.write(b'{"t": 1, "ch')
    log = DoneLog(p)
    assert set(log.done) == {(0, 3)} and log.skipped() == {7: "bad"}
    log.record(1, 3, [])
    log.close()
    assert [json.loads(x)["t"] for x in p.read_text().splitlines()] == [0, 1]
    with open(p, "ab") as f:
        f.write(p.read_bytes().splitlines(keepends=True)[0])
    with pytest.raises(DataError, match="twice"):
        DoneLog(p)
    p.write_bytes(b"garbage\n")
    with pytest.raises(DataError, match="line 1"):
        DoneLog(p)


def test_one_process_per_rank(tmp_path):
    layout = ChunkLayout(10, 4, 1, 0)
    chunks = [np.arange(10)[s: s + 4] for s in range(0, 10, 4)]
    first = RankStore(tmp_path, layout, chunks, 1, 1, 1)
    try:
        with pytest.raises(FFEngineError, match="another process"):
            RankStore(tmp_path, layout, chunks, 1, 1, 1)
    finally:
        first.close()
    RankStore(tmp_path, layout, chunks, 1, 1, 1).close()  # the lock goes with its holder


@pytest.mark.parametrize("n,chunk,world", [(1, 4, 1), (10, 4, 1), (10, 4, 2), (10, 4, 3),
                                           (10, 4, 5), (12, 4, 3), (7, 1, 4)])
def test_chunk_layout_partitions_the_order(n, chunk, world):
    seen = []
    for r in range(world):
        lay = ChunkLayout(n, chunk, world, r)
        pos = lay.order_positions(0, lay.n_local)
        assert len(pos) == lay.n_local
        for j in lay.owned:
            want = np.arange(j * chunk, j * chunk + lay.chunk_len(j))
            got = pos[lay.offset(j): lay.offset(j) + lay.chunk_len(j)]
            assert np.array_equal(got, want)
        seen.append(pos)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(n))


def test_result_arrays_are_the_documented_shapes(trace_setup, straight):
    out, summary = straight
    n = trace_setup["n"]
    shapes = {name: np.load(out / name, mmap_mode="r").shape for name in RESULT_ARRAYS}
    assert shapes["terms.npy"] == (2, 1, n, 1) and shapes["scores.npy"] == (n, 1)
    assert shapes["detection_scores.npy"] == (n,)
    assert summary["n_flagged"] == shapes["flagged.npy"][0]
