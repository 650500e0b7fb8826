"""``trace``: score every pre-training input, flag the MAD outliers, aggregate by domain.

A finished result directory holds::

    metadata.json          run, checkpoints, index, instances and options the results
                           belong to (written first; checked before any work on a restart)
    scores.npy             (n, K) float32: s_ik per sample and instance (NaN: skipped)
    terms.npy              (T, D, n, K) float32: per-checkpoint, per-draw terms
    detection_scores.npy   (n,) float32: the score the MAD rule reads (the instances' mean, or min)
    flagged.npy            int64 ids above median + k·MAD (with ``threshold="mad-split"``:
                           of those, the ones above Otsu's split where it is clear)
    domains.json / .txt    flagged / scored total per source domain (skipped samples counted
                           apart) and the domain-level verdict
                           (a Fisher exact test against the other domains), suspicious first
    scores.png             score distribution with the threshold (and Otsu's cut where
                           ``mad-split`` applied it)
    summary.json           counts, threshold, backend, skipped samples, suspicious
                           domains; written last

Resumable: the work is split into (checkpoint, chunk) pieces that are streamed into
memmapped files under ``partial/`` and recorded as done one by one
(:mod:`ffengine.engine.store`). Killed at any point and started again with the same
arguments, ``trace`` checks ``metadata.json`` before doing anything, scores only the pieces
not recorded, and ends with files bit-for-bit equal to an uninterrupted run's. Started on a
finished directory, it returns the stored summary.

Distributed: in a torch.distributed process group (``torchrun --nproc-per-node N -m --
ffengine trace ...``: the ``--`` keeps torchrun from reading ``--run`` as its own option),
chunk ``j`` is scored by rank ``j % N``, each rank aggregates its own samples, the exact
median/MAD all-reduce the selection histograms, and rank 0 assembles the arrays and writes
the report. The result equals a single process's, bit for bit.

Every file is written to a temporary name and renamed; ``partial/`` is removed at the end.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.index import SampleIndex
from .data.loader import iter_chunks
from .detect import MADStats, flag, refine_flagged_file, robust_stats
from .engine import distributed
from .engine.distributed import Dist
from .engine.instance import Instance
from .engine.scoring import Engine, checkpoint_weights
from .engine.store import (
    METADATA,
    PARTIAL_DIR,
    SUMMARY,
    ChunkLayout,
    RankStore,
    assemble,
    open_result_dir,
    read_skipped,
    remove_partial,
    result_metadata,
)
from .errors import ConfigError, DataError
from .io_utils import atomic_write_bytes, atomic_write_json
from .options import THRESHOLD_RULES, check_choice
from .report import (
    domain_table,
    format_domain_table,
    plot_score_distribution,
    reference_class_share,
)


def _keep_started_backend(engine: Engine, out: Path) -> None:
    """A trace resumed with the backend left to auto keeps the backend it was started with
    (auto's choice may have changed since: another version, machine or extension build), so
    that its pieces are all scored alike; an explicit ``backend`` is checked as usual."""
    try:
        started = json.loads((out / METADATA).read_text())["options"]["backend"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a fresh directory, or not a trace: open_result_dir says what is wrong
    if isinstance(started, str):
        engine.adopt_backend(started)


def trace(engine: Engine, index: SampleIndex, instances: Sequence[Instance], out: str | Path,
          k: float = 3.0, instance_paths: Sequence[str] | None = None,
          dist: Dist | None = None, skip_unreadable: bool = False,
          threshold: str = "mad") -> dict | None:
    """Run the whole traceback into ``out`` (resuming unfinished work there) and return the
    summary.

    ``threshold``: ``"mad"`` flags the scores above ``median + k·MAD`` (the paper's rule);
    ``"mad-split"`` keeps, of those, the ones above Otsu's split of the flagged scores where
    the split is clear (:func:`ffengine.detect.refine_by_split`; an experiment under test,
    docs/PREREGISTRATION.md entry 4).

    ``dist``: this process's place in a group of scoring processes; default: the initialized
    torch.distributed default group, if any, else a single process. Every process of the
    group must call ``trace`` with the same arguments. The summary is returned on rank 0;
    other ranks return ``None`` once their share is done. Raises ManifestMismatchError (on
    every rank, before any work) if ``out`` holds a trace of other inputs or options.

    A shard that cannot be read stops the trace (ShardReadError; a resume retries it once the
    shard is back); ``skip_unreadable`` records its samples as skipped instead, for a shard
    lost for good (the run's index cannot change, so this is how such a trace finishes).
    """
    if not k >= 0:
        raise ConfigError(f"k must be non-negative, got {k}.")
    check_choice("threshold", threshold, THRESHOLD_RULES)
    if not instances:
        raise ConfigError("trace needs at least one backdoor instance.")
    dist = distributed.current() if dist is None else dist
    out = Path(out)

    _keep_started_backend(engine, out)

    def check() -> str | None:
        engine.run.check_index(index.hash, index.path)
        if not dist.is_main:
            return None
        meta = result_metadata(engine, index, instances, k, dist.world_size, instance_paths,
                               threshold)
        return open_result_dir(out, meta)

    status = dist.broadcast(dist.run_everywhere(check))
    if status == "complete":
        if not dist.is_main:
            return None
        remove_partial(out)  # a run killed after writing the summary may leave it behind
        return json.loads((out / SUMMARY).read_text())

    n, K, T, D = len(index), len(instances), len(engine.checkpoints), engine.draws
    chunks = engine.chunks(n)
    layout = ChunkLayout(n, engine.chunk_size, dist.world_size, dist.rank)
    store = dist.run_everywhere(
        lambda: RankStore(out / PARTIAL_DIR, layout, chunks, T, D, K))
    try:
        done_before = len(store.log.done)
        cos = _score_pieces(engine, index, instances, store, dist, skip_unreadable)
        # a collective: also waits until every rank's pieces are done
        skipped = store.log.skipped()
        counts = dist.all_reduce_sum(np.array([done_before, len(store.log.done) - done_before,
                                               store.n_pieces, len(skipped)], np.int64))
        if counts[3] == n:  # every rank sees it: nothing was scored, so no threshold exists
            first = skipped[min(skipped)] if skipped else "see the other ranks"
            raise DataError(f"every one of the {n} samples was skipped (e.g. {first}); "
                            "nothing was scored. Fix the data and trace again.")
        # rank 0 always holds cos; the others need it only to weight checkpoints by it
        cos = dist.broadcast(cos) if engine.weighting != "lr" else cos
        weights = None if cos is None else checkpoint_weights(cos, engine.weighting)
        _, det_path = dist.run_everywhere(
            lambda: store.write_scores(engine.aggregate, weights, engine.combine))
        stats = robust_stats(det_path, allreduce=dist.all_reduce_sum)  # exact, over all ranks
        if not dist.is_main:
            return None
        pieces = {"total": int(counts[2]), "done_before": int(counts[0]),
                  "scored": int(counts[1])}
        # rank 0 keeps its lock until the summary is written: a process started meanwhile
        # is refused instead of deleting the report's temporaries or the partial files
        ref_labels = [inst.meta.get("x_r_label", -1) for inst in instances]
        return _report(engine, index, out, k, stats, cos, weights, dist.world_size, pieces,
                       ref_labels, threshold)
    finally:
        store.close()


def _score_pieces(engine: Engine, index: SampleIndex, instances: Sequence[Instance],
                  store: RankStore, dist: Dist, skip_unreadable: bool = False) -> np.ndarray | None:
    """Score this rank's missing pieces; returns cos (T, K) on rank 0 (None elsewhere)."""
    todo = store.todo()
    if not todo and not dist.is_main:
        return None
    # the decoding workers start now and decode while the checkpoints load
    batches = iter_chunks(index, [store.chunks[j] for j in todo], workers=engine.workers,
                          pin_memory=engine.device.type == "cuda",
                          captions=engine.objective.needs_captions,
                          skip_unreadable=skip_unreadable)
    state = engine.prepare(instances, index)  # rank 0 always: the summary reports cos
    n_todo = sum(len(ts) for ts in todo.values())
    bar = tqdm(total=store.n_pieces, initial=store.n_pieces - n_todo, unit="piece",
               desc="score" if dist.world_size == 1 else f"score (rank {dist.rank})",
               disable=not engine.progress)
    for (j, ts), batch in zip(todo.items(), batches, strict=True):
        images = engine.to_device(batch) if len(batch) else None
        for t in ts:
            terms = engine.score_piece(state, t, batch, images)
            store.write_piece(t, j, batch.ids, batch.skipped, terms)
            bar.update(1)
    bar.close()
    return state.cos


def _report(engine: Engine, index: SampleIndex, out: Path, k: float, stats: MADStats,
            cos: np.ndarray, weights: np.ndarray | None, world_size: int,
            pieces: dict, reference_labels: Sequence[int] = (),
            threshold: str = "mad") -> dict:
    """Rank 0: assemble the id-ordered arrays, flag, write the report and the summary
    (``weights``: the checkpoint multipliers the scores were aggregated with, or None;
    ``reference_labels``: the instances' x_r classes, -1 where unknown)."""
    n, T, D = len(index), len(engine.checkpoints), engine.draws
    K = cos.shape[1]
    partial = out / PARTIAL_DIR
    skipped = sorted(read_skipped(partial, world_size).items())
    assemble(out, engine.sample_order(n), engine.chunk_size, world_size, T, D, K)
    thr = stats.threshold(k)
    flag(out / "detection_scores.npy", k, out=out / "flagged.npy", stats=stats)
    split = None  # mad-split: Otsu's cut of the MAD-flagged scores, and the MAD count
    if threshold == "mad-split":
        n_mad = int(np.load(out / "flagged.npy", mmap_mode="r").shape[0])
        cut = refine_flagged_file(out / "detection_scores.npy", out / "flagged.npy")
        split = {**cut.to_dict(), "n_flagged_mad": n_mad}
    flagged = np.load(out / "flagged.npy")
    rows = domain_table(flagged, index.domains, index.domain_names,
                        skipped_ids=[i for i, _ in skipped])
    atomic_write_json(out / "domains.json", rows)
    atomic_write_bytes(out / "domains.txt", format_domain_table(rows).encode())
    det = np.load(out / "detection_scores.npy", mmap_mode="r")
    plot_score_distribution(det, float(thr), out / "scores.png",
                            title=f"maliciousness scores (n={n}, k={k:g})",
                            cut=split["threshold"] if split and split["applied"] else None)
    del det
    summary = {
        "n": n,
        "n_scored": int(stats.n),
        "n_flagged": int(len(flagged)),
        "k": k,
        "median": float(stats.median),
        "mad": float(stats.mad),
        "threshold": float(thr),
        "threshold_rule": threshold,
        # mad-split: Otsu's cut of the MAD-flagged scores, its η, whether it applied, and how
        # many the MAD rule alone flagged; null for "mad"
        "split": split,
        "backend": engine.backend,
        # the backbone forward of this call: "compiled" (torch.compile) or "eager", and why
        # a compiled one went back to eager (null if it did not); outputs agree to rounding
        "backbone": "compiled" if engine.backbone_compiled else "eager",
        "backbone_fallback": engine.backbone_fallback,
        # the same for the augmentation's colour stage (compiled with the backbone)
        "colour_ops": "compiled" if engine.colour_compiled else "eager",
        "colour_ops_fallback": engine.colour_fallback,
        "checkpoints": [c.epoch for c in engine.checkpoints],
        "cos_per_checkpoint": cos.tolist(),
        "draws": engine.draws,
        "aggregate": engine.aggregate,
        "weighting": engine.weighting,
        "combine": engine.combine,
        # (T, K) multipliers of each checkpoint's terms; null for "lr" (Eq. 5 as written)
        "checkpoint_weights": None if weights is None else weights.tolist(),
        "chunk_size": engine.chunk_size,
        # (checkpoint, chunk) pieces: how many, and how many an earlier, interrupted call
        # had finished; scored = total - done_before, each piece exactly once
        "pieces": pieces,
        "world_size": world_size,
        "skipped": [{"id": i, "key": index.key(i), "reason": r} for i, r in skipped],
        "top_domains": rows[:5],
        # the domain-level verdict (ffengine.detect.domains): a Fisher exact test per domain
        "suspicious_domains": [r["domain"] for r in rows if r["suspicious"]],
        # how much of the flagged set is of x_r's class (the usual false positives); null
        # where the index has no labels or x_r's class is unknown
        "reference_class": reference_class_share(
            flagged, index.labels, reference_labels, [i for i, _ in skipped]),
    }
    atomic_write_json(out / SUMMARY, summary)  # last: its presence marks a finished trace
    remove_partial(out)
    return summary


def load_results(path: str | Path) -> dict:
    """The arrays and summary of a result directory."""
    path = Path(path)
    try:
        return {
            "summary": json.loads((path / SUMMARY).read_text()),
            "detection_scores": np.load(path / "detection_scores.npy", mmap_mode="r"),
            "flagged": np.load(path / "flagged.npy"),
        }
    except (OSError, ValueError) as e:
        hint = (" It is unfinished: run the same `ffengine trace` command again to resume it."
                if (path / PARTIAL_DIR).exists() else " Run `ffengine trace` into it first.")
        raise DataError(f"{path} is not a complete trace result ({e}).{hint}") from e


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
