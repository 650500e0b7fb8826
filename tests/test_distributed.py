"""Sharded tracing on torch.distributed: two gloo processes under torchrun give the scores,
terms and flagged ids of one process, bit for bit; the exact MAD spans the shards."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from ffengine.data.index import SampleIndex
from ffengine.engine import distributed
from ffengine.engine.distributed import SINGLE, Dist, local_device, process_group_from_env
from ffengine.engine.scoring import Engine
from ffengine.errors import ConfigError, DataError, ManifestMismatchError
from ffengine.trace import trace

from .trace_fixture import (
    assert_same_results,
    env,
    shared_reference,
    trace_args,
    with_cos,
)

# torch on one thread for every test here; the subprocesses get one thread through env()
pytestmark = pytest.mark.usefixtures("one_thread")


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    # "--standalone": a local rendezvous on a free port. "--" ends torchrun's own options, so
    # that ours (--run is a prefix of torchrun's --run-path) pass through untouched.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "--", "ffengine", *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)


def test_two_gloo_processes_equal_one_process(trace_setup, tmp_path_factory, tmp_path):
    ref = shared_reference(tmp_path_factory, trace_setup)
    out = tmp_path / "two"
    r = _torchrun(2, trace_args(trace_setup, out))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x for x in r.stdout.strip().splitlines() if x.startswith("{")]
    assert len(lines) == 1  # rank 0 alone reports
    summary = json.loads(lines[0])
    assert summary["world_size"] == 2
    assert_same_results(out, ref)
    want = json.loads((ref / "summary.json").read_text())
    for key in ("n", "n_scored", "n_flagged", "median", "mad", "threshold", "top_domains",
                "suspicious_domains", "cos_per_checkpoint", "pieces"):
        assert summary[key] == want[key], key
    assert [s["id"] for s in summary["skipped"]] == [s["id"] for s in want["skipped"]]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["options"]["world_size"] == 2
    assert not (out / "partial").exists()

    # other options: every rank stops before any work, naming both values
    r = _torchrun(2, trace_args(trace_setup, out, "--k", "2"))
    assert r.returncode != 0
    assert "options.k = 3.0" in r.stderr and "options.k = 2.0" in r.stderr
    assert "rank 0: " in r.stderr  # rank 1 reports rank 0's finding
    # the chunks belong to other ranks with another process count
    r = subprocess.run([sys.executable, "-m", "ffengine", *trace_args(trace_setup, out)], env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "options.world_size = 2" in r.stderr and "same number of processes" in r.stderr


def test_single_process_collectives_are_identities():
    a = np.arange(5, dtype=np.int64)
    assert SINGLE.all_reduce_sum(a) is a
    assert SINGLE.broadcast({"x": 1}) == {"x": 1} and SINGLE.all_gather(3) == [3]
    SINGLE.barrier()
    assert SINGLE.is_main and not SINGLE.active
    assert distributed.current() == SINGLE
    with pytest.raises(DataError, match="boom"):
        SINGLE.run_everywhere(lambda: (_ for _ in ()).throw(DataError("boom")))
    assert SINGLE.run_everywhere(lambda: 7) == 7


def test_environment_without_launcher(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with process_group_from_env("cpu") as d:
        assert d == SINGLE
    assert local_device("cuda") == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device("cuda") == torch.device("cuda", 3)
    assert local_device("cuda:1") == torch.device("cuda", 1)
    assert local_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"), process_group_from_env("cpu"):
        pass



# ---------------------------------------------------------------------------------------
# ranks as threads of this process: the sharding logic, fast, with odd splits
# ---------------------------------------------------------------------------------------
class _Hub:
    """Collectives among the threads standing in for ranks."""

    def __init__(self, world: int):
        # only a deadlock should trip it: a rank without chunks waits here for the others'
        # whole scoring, which took over 120 s once on a loaded 2-core machine
        self.barrier = threading.Barrier(world, timeout=600)
        self.slots: list[Any] = [None] * world

    def exchange(self, rank: int, value: Any, combine) -> Any:
        self.slots[rank] = value
        self.barrier.wait()
        out = combine(list(self.slots))
        self.barrier.wait()
        return out


@dataclass(frozen=True)
class _ThreadDist(Dist):
    hub: _Hub | None = None

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        return self.hub.exchange(self.rank, np.array(array), lambda xs: np.sum(xs, axis=0))

    def broadcast(self, obj, src: int = 0):
        return self.hub.exchange(self.rank, obj, lambda xs: xs[src])

    def all_gather(self, obj) -> list:
        return self.hub.exchange(self.rank, obj, list)


def _threaded_trace(trace_setup, out, world: int, cos: np.ndarray | None = None, **kw) -> list:
    hub, results = _Hub(world), [None] * world

    def rank(r: int) -> None:
        try:
            engine = Engine(trace_setup["run"], progress=False, **kw)
            if cos is not None:
                engine = with_cos(engine, cos)
            results[r] = trace(engine, SampleIndex(trace_setup["root"] / "index"),
                               [trace_setup["instance"]], out, dist=_ThreadDist(r, world, hub=hub))
        except Exception as e:  # handed to the test thread
            results[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("world,batch", [(3, 8), (3, 64)])  # (3, 64): rank 2 has no chunk
def test_ranks_in_threads_equal_one_rank(trace_setup, tmp_path, world, batch):
    kw = dict(batch_size=batch, chunk_batches=1, draws=1)
    single = trace(Engine(trace_setup["run"], progress=False, **kw), trace_setup["index"],
                   [trace_setup["instance"]], tmp_path / "one")
    results = _threaded_trace(trace_setup, tmp_path / "many", world, **kw)
    assert all(r is None for r in results[1:]), results
    summary = results[0]
    assert isinstance(summary, dict), summary
    assert summary["world_size"] == world
    assert summary["pieces"] == single["pieces"]
    assert_same_results(tmp_path / "many", tmp_path / "one")

    # every rank refuses other options before any work, with rank 0's message
    results = _threaded_trace(trace_setup, tmp_path / "many", world, **{**kw, "seed": 9})
    assert all(isinstance(r, ManifestMismatchError) for r in results), results
    assert all("options.seed = 0" in str(r) for r in results)


def test_rise_weighting_reaches_every_rank(trace_setup, tmp_path, monkeypatch):
    """weighting="rise" needs cos on every rank to aggregate its shard, including a rank
    whose pieces were all scored before a resume (it loads no checkpoint, so it has no cos
    of its own): rank 0 broadcasts it."""
    import ffengine.trace as trace_module

    score_pieces = trace_module._score_pieces

    def as_if_resumed(engine, index, instances, store, dist, *rest):
        cos = score_pieces(engine, index, instances, store, dist, *rest)
        return cos if dist.is_main else None  # what a rank with nothing left to do returns

    monkeypatch.setattr(trace_module, "_score_pieces", as_if_resumed)
    kw = dict(batch_size=8, chunk_batches=1, draws=1, weighting="rise")
    cos = np.array([[0.2], [0.7]], dtype=np.float32)  # a rise of 0.5 into the last checkpoint
    single = trace(with_cos(Engine(trace_setup["run"], progress=False, **kw), cos),
                   trace_setup["index"], [trace_setup["instance"]], tmp_path / "one")
    np.testing.assert_allclose(single["checkpoint_weights"], [[0.0], [0.5]], rtol=1e-6)
    results = _threaded_trace(trace_setup, tmp_path / "many", 3, cos=cos, **kw)
    assert all(r is None for r in results[1:]), results
    assert results[0]["checkpoint_weights"] == single["checkpoint_weights"]
    assert_same_results(tmp_path / "many", tmp_path / "one")
    scores = np.load(tmp_path / "one" / "scores.npy")
    terms = np.load(tmp_path / "one" / "terms.npy")
    assert np.abs(terms[1]).max() > 0
    ok = ~np.isnan(scores[:, 0])  # the fixture's undecodable samples score NaN
    assert 0 < ok.sum() < len(ok)
    np.testing.assert_allclose(scores[ok, 0], 0.5 * terms[1, 0, ok, 0], rtol=1e-5,
                               atol=1e-7 * np.abs(terms).max())
