"""The scoring engine: ``Engine(run).score(index, instances)``.

For every pre-training input ``x_i`` and backdoor instance ``k`` (DESIGN.md §2)::

    s_ik = Σ_t α_t ⟨G_tk, g_it⟩ / ‖g_it‖

The run's objective (:mod:`ffengine.engine.objective`: SimCLR or CLIP) loads each
checkpoint, takes the cosine gradients and scores a batch; the backbone runs once per view,
checkpoint and draw without an autograd graph however many instances there are, and the
scored layers' per-sample signals feed the ghost algebra (:mod:`ffengine.engine.head`).
Per-(checkpoint, draw) terms are kept in ``terms`` (T, D, n, K) so aggregations over draws
and checkpoint subsets need no re-scoring.

The unit of work is a *piece*: one checkpoint on one chunk of ``batch_size × chunk_batches``
samples (:meth:`Engine.score_piece`). :meth:`Engine.score` runs every piece in memory;
:func:`ffengine.trace.trace` runs them resumably, sharded across processes, into a result
directory. Both give the same bits: a piece depends only on the seed, the sample order and
its chunk.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.index import SampleIndex
from ..data.loader import DecodedBatch, iter_chunks
from ..data.packed import PackedImages
from ..errors import BackendUnavailableError, ConfigError, DataError
from ..ops.ghost_score import ENV_VAR as BACKEND_ENV_VAR
from ..ops.ghost_score import resolve_backend
from ..options import AGGREGATES, CHECKPOINT_WEIGHTS, COMBINES, check_choice
from ..run import Checkpoint, Run
from .compiled_backbone import BackboneRunner, ColourRunner, resolve_compile
from .float32 import ieee_float32
from .instance import Instance
from .objective import objective_for


@dataclass
class ScoringState:
    """What every piece of a scoring job shares: the index being scored (objectives read
    captions from it), the selected checkpoints' models (eval mode), their stacked cosine
    gradients {parameter: (K, ...)} and cos (T, K)."""

    index: SampleIndex
    models: list[torch.nn.Module]
    grads: list[dict[str, torch.Tensor]]
    cos: np.ndarray


@dataclass
class ScoreResult:
    """scores: (n, K) float32, NaN for skipped samples; terms: (T, D, n, K) float32 per
    checkpoint and draw, already weighted by the learning rate."""

    scores: np.ndarray
    terms: np.ndarray
    checkpoints: list[Checkpoint]
    cos: np.ndarray  # (T, K) cos(f_t(x_b), f_t(x_r)) at each checkpoint
    skipped: list[tuple[int, str]] = field(default_factory=list)
    backend: str = "torch"
    combine: str = "mean"

    @property
    def detection_scores(self) -> np.ndarray:
        """One score per sample for the MAD rule: the instances' scores combined."""
        return detection_scores(self.scores, self.combine)


def detection_scores(scores: np.ndarray, combine: str = "mean") -> np.ndarray:
    """(n, K) scores -> (n,) float32 detection scores: the mean over instances, or with
    ``combine="min"`` the minimum (a sample must raise the cosine of every instance); NaN
    stays NaN."""
    scores = np.asarray(scores, dtype=np.float32)
    if check_choice("combine", combine, COMBINES) == "min":
        return scores.min(axis=1)
    return scores.mean(axis=1, dtype=np.float32)


def checkpoint_weights(cos: np.ndarray, how: str) -> np.ndarray | None:
    """(T, K) multipliers of each checkpoint's (already learning-rate-weighted) terms, per
    instance, from ``cos`` (T, K) = cos(f_t(x_b), f_t(x_r)) at the selected checkpoints.

    ``lr``: None (Eq. 5 as written: every checkpoint counts with its learning rate alone).
    ``rise``: ``max(0, cos_t - cos_{t-1})``, how much the cosine rose over the epochs since
    the previous selected checkpoint, so checkpoints from before the backdoor formed, or
    while it was unlearned, count for nothing. The first selected checkpoint gets 0: runs do
    not save the initial model, so the rise into it is unknown.
    """
    if check_choice("weighting", how, CHECKPOINT_WEIGHTS) == "lr":
        return None
    cos = np.asarray(cos, dtype=np.float64)
    w = np.zeros_like(cos)
    w[1:] = np.maximum(0.0, np.diff(cos, axis=0))
    flat = np.flatnonzero(~(w > 0).any(axis=0))
    if len(flat):
        warnings.warn(f"weighting 'rise': the cosine never rose between the selected "
                      f"checkpoints for instance(s) {flat.tolist()}, so they score 0 for every "
                      f"sample; select other checkpoints or use weighting 'lr'.", stacklevel=2)
    return w


def aggregate_draws(terms: np.ndarray, how: str,
                    weights: np.ndarray | None = None) -> np.ndarray:
    """(T, D, n, K) terms -> (n, K) scores: sum over checkpoints (each checkpoint and
    instance times ``weights`` (T, K) when given), then ``how`` over draws."""
    check_choice("aggregate", how, AGGREGATES)
    if weights is None:
        per_draw = terms.sum(axis=0, dtype=np.float64)  # (D, n, K)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (terms.shape[0], terms.shape[3]):
            raise ValueError(f"weights of shape {w.shape} for terms of shape {terms.shape}")
        per_draw = np.einsum("tdnk,tk->dnk", terms, w, dtype=np.float64)
    if how == "mean":
        out = per_draw.mean(axis=0)
    elif how == "max":
        out = per_draw.max(axis=0)
    else:  # median
        out = np.median(per_draw, axis=0)
    return out.astype(np.float32)


# decoding processes for a GPU pass: an H200 runs the demo's model at 139,000 backbone
# images/s in float32 (70,000 samples/s), and its host's workers decoded about 4,500 32x32
# images a second each, start-up included (2026-12-04, bench/engine_profile.py: PNGs, which
# PIL decodes as fast as the demo's JPEGs), so the 8 workers of the first GPU measurements
# left the GPU waiting
GPU_DECODE_WORKERS = 12


def default_workers(device: torch.device | str) -> int:
    """Decoding processes when the caller names none: 0 on a CPU (the scoring threads use
    every core, and decoding is 3-5% of a one-draw CPU pass: a worker would compete with
    them), on a GPU up to ``GPU_DECODE_WORKERS``, two cores left to the scoring process
    (the cores shared by the processes of a multi-GPU trace on one host: LOCAL_WORLD_SIZE)."""
    if torch.device(device).type == "cpu":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(GPU_DECODE_WORKERS, cores - 2))


def _names_a_backend(name: object) -> bool:
    """Whether ``name`` picks a backend rather than leaving it to auto."""
    return name is not None and str(name).strip().lower() not in ("", "auto")


class Engine:
    """Scores pre-training inputs against backdoor instances with a run's checkpoints.

    Args:
        run: a :class:`Run` or its directory.
        checkpoints: "all", "last", or a list of epochs to use.
        device: where the model runs.
        backend: ghost-score backend, ``auto|torch|cpu|triton|cuda``.
        draws: augmentation draws per sample and checkpoint (the paper: 1).
        aggregate: how per-draw scores combine: mean, max or median.
        weighting: how checkpoints count besides their learning rate: "lr" (Eq. 5) or
            "rise" (by how much cos(f(x_b), f(x_r)) rose since the previous selected
            checkpoint, per instance: :func:`checkpoint_weights`; needs 2+ checkpoints).
        combine: how the instances' scores make the detection score: "mean" or "min".
        batch_size: scoring batch (the negatives); default: the pre-training batch size.
        seed: seeds the sample order and the scoring views.
        workers: image-decoding processes; None: :func:`default_workers` (0 on a CPU,
            several on a GPU). They never change a score.
        reference: score with the slow per-sample autograd reference instead of the ghost
            fast path (same batches, views and negatives): for tests and audits.
        layers: module paths of the scored layers instead of the run's (e.g.
            ``("head.fc2",)``: the paper's scored-layer ablation).
        precision: "float32", or "bfloat16" to run the backbone under bf16 autocast (the
            scored layers' maths stays float32); faster only where the device has bf16
            units. How much scores move: bench/README.md.
        compile_backbone: "auto", "on" or "off": run the backbone forward, and the
            augmentation's colour stage that feeds it, through ``torch.compile``
            (:mod:`ffengine.engine.compiled_backbone`; outputs within rounding of eager's;
            on the dev CPU no faster than the eager backbone with its batch norms folded).
            "auto" compiles a pass of at least ``AUTO_MIN_IMAGES`` backbone images of a
            SimCLR run on a GPU; never on a CPU, never the reference.
    """

    def __init__(self, run: Run | str | Path, checkpoints: str | Sequence[int] = "all",
                 device: torch.device | str = "cpu", backend: str | None = "auto",
                 draws: int = 1, aggregate: str = "mean", batch_size: int | None = None,
                 seed: int = 0, chunk_batches: int = 16, workers: int | None = None,
                 progress: bool = True, reference: bool = False,
                 layers: Sequence[str] | None = None, precision: str = "float32",
                 weighting: str = "lr", combine: str = "mean",
                 compile_backbone: str = "auto"):
        self.run = run if isinstance(run, Run) else Run(run)
        self.objective = objective_for(self.run)
        supported = getattr(self.objective, "precisions", ("float32",))
        if precision not in supported:
            raise ConfigError(f"precision {precision!r} is not available for "
                              f"{self.objective.name} runs; expected one of {supported}.")
        if precision != "float32":
            self.objective.precision = precision
        self.precision = precision
        if layers is not None:
            if not layers:
                raise ConfigError("layers must name at least one scored layer.")
            self.objective.layers = tuple(layers)
        self.layers_overridden = layers is not None
        if draws > 1 and not self.objective.draws_matter:
            raise ConfigError(f"{self.objective.name} scores a fixed view of each sample: "
                              f"more than one draw repeats the same work; use draws=1.")
        self.device = torch.device(device)
        self.backend = resolve_backend(backend, device=self.device)
        # left to auto (no argument, no FFENGINE_BACKEND): a resumed trace may keep the backend
        # it began with (adopt_backend)
        self.backend_chosen = (_names_a_backend(backend)
                               or _names_a_backend(os.environ.get(BACKEND_ENV_VAR)))
        if draws < 1:
            raise ConfigError(f"draws must be at least 1, got {draws}.")
        check_choice("aggregate", aggregate, AGGREGATES)
        self.draws, self.aggregate, self.seed = draws, aggregate, seed
        # an imported foreign checkpoint records no pre-training batch size: 256 then
        self.batch_size = batch_size or int(
            self.run.manifest.get("training", {}).get("batch_size") or 256)
        if self.batch_size < 1 or chunk_batches < 1:
            raise ConfigError(f"batch_size and chunk_batches must be at least 1, got "
                              f"{self.batch_size} and {chunk_batches}.")
        self.chunk_batches, self.progress = chunk_batches, progress
        self.workers = default_workers(self.device) if workers is None else workers
        if self.workers < 0:
            raise ConfigError(f"workers must be 0 or more, got {self.workers}.")
        self.reference = reference
        self.checkpoints = self._select(checkpoints)
        check_choice("weighting", weighting, CHECKPOINT_WEIGHTS)
        if weighting == "rise" and len(self.checkpoints) < 2:
            raise ConfigError("weighting 'rise' compares each checkpoint's cosine with the "
                              "previous one's: select at least 2 checkpoints (e.g. 'all').")
        self.weighting = weighting
        self.combine = check_choice("combine", combine, COMBINES)
        # checks the mode now, not after loading checkpoints (also where "on" cannot apply)
        resolve_compile(compile_backbone, 0, getattr(self.objective, "compilable", False),
                        reference)
        self.compile_backbone = compile_backbone

    def _select(self, which: str | Sequence[int]) -> list[Checkpoint]:
        ckpts = self.run.checkpoints
        if not ckpts:
            raise ConfigError(f"run {self.run.path} has no checkpoints yet.")
        if which == "all":
            return ckpts
        if which == "last":
            return ckpts[-1:]
        by_epoch = {c.epoch: c for c in ckpts}
        missing = [e for e in which if e not in by_epoch]
        if missing:
            raise ConfigError(f"run {self.run.path} has no checkpoint at epoch(s) {missing}; "
                              f"it has {sorted(by_epoch)}.")
        return [by_epoch[e] for e in which]

    # -- the pieces of a scoring job, shared by score() and the resumable trace ----------
    @property
    def chunk_size(self) -> int:
        """Samples per chunk: the unit of decoding, of resumption and of sharding."""
        return self.batch_size * self.chunk_batches

    def sample_order(self, n: int) -> np.ndarray:
        """(n,) int64: the order samples are scored in; a function of ``seed`` and ``n``."""
        return np.random.default_rng([self.seed, 7]).permutation(n)

    def chunks(self, n: int) -> list[np.ndarray]:
        """Chunk ``j`` holds the ids ``sample_order(n)[j*C:(j+1)*C]``, C = chunk_size. A
        sample's negatives are the other members of its batch within its chunk, so scores
        depend on the seed and this order only, never on which chunks ran when or where."""
        order, c = self.sample_order(n), self.chunk_size
        return [order[s: s + c] for s in range(0, n, c)]

    def options(self) -> dict:
        """Every option that changes the scores (recorded with results, checked on resume)."""
        return {"checkpoints": [c.epoch for c in self.checkpoints], "draws": self.draws,
                "aggregate": self.aggregate, "batch_size": self.batch_size,
                "chunk_batches": self.chunk_batches, "seed": self.seed,
                "backend": self.backend, "reference": self.reference,
                "device_type": self.device.type,
                # only when not the default: earlier traces keep their metadata
                **({"layers": list(self.objective.layers)} if self.layers_overridden else {}),
                **({"precision": self.precision} if self.precision != "float32" else {}),
                **({"weighting": self.weighting} if self.weighting != "lr" else {}),
                **({"combine": self.combine} if self.combine != "mean" else {})}

    def prepare(self, instances: Sequence[Instance], index: SampleIndex) -> ScoringState:
        """Load every selected checkpoint (in the objective's fast form, ``scoring_model``,
        unless this is the reference) and take its stacked cosine gradient."""
        if not instances:
            raise ConfigError("score needs at least one backdoor instance.")
        has_caption = np.asarray(index.records["txt_size"]) >= 0
        if self.objective.needs_captions and not has_caption.any():
            raise DataError(f"index {index.path} has no captions (KEY.txt), and this run is a "
                            "CLIP run, which scores image-caption pairs; index the captioned "
                            "shards (see ffengine.data.captions).")
        state = ScoringState(index, [], [], np.zeros((len(self.checkpoints), len(instances)),
                                                     dtype=np.float32))
        self._set_backbone(len(index))
        xb = [inst.tensors(self.device)[0] for inst in instances]
        xr = [inst.tensors(self.device)[1] for inst in instances]
        # the fast path's form of the model (SimCLR: batch norms folded into the backbone's
        # convolutions); the reference scores the model as it was saved
        fast_form = None if self.reference else getattr(self.objective, "scoring_model", None)
        for t, ckpt in enumerate(self.checkpoints):
            model = self.objective.load_model(ckpt, self.device)
            if fast_form is not None:
                model = fast_form(model)
            with ieee_float32(self.device):
                g, c = self.objective.cosine_gradients(model, xb, xr)
            state.models.append(model)
            state.grads.append(g)
            state.cos[t] = c.detach().cpu().numpy()
        return state

    def adopt_backend(self, name: str) -> bool:
        """Take backend ``name`` (that of an interrupted trace being resumed) when this engine's
        backend was left to auto and ``name`` runs here; True if the engine now uses it."""
        if self.backend_chosen or name == self.backend:
            return name == self.backend
        try:
            self.backend = resolve_backend(name, device=self.device)
        except BackendUnavailableError:  # not built / cannot run here: keep auto's choice
            return False
        return True

    def _set_backbone(self, n: int) -> None:
        """Give the objective its backbone and colour-stage runners, compiled or not (both
        or neither), for a pass over n samples."""
        compilable = getattr(self.objective, "compilable", False)
        images = n * self.objective.views * self.draws * len(self.checkpoints)
        if compilable:
            compiled = resolve_compile(self.compile_backbone, images, compilable, self.reference,
                                       self.device)
            self.objective.backbone = BackboneRunner(compiled)
            self.objective.colour = ColourRunner(compiled)

    def _runner(self, name: str):
        """The objective's ``backbone`` or ``colour`` runner (None where it has none)."""
        return getattr(self.objective, name, None)

    @property
    def backbone_compiled(self) -> bool:
        """Whether the backbone runs compiled now (false again after a fallback to eager)."""
        return bool(getattr(self._runner("backbone"), "compiled", False))

    @property
    def backbone_fallback(self) -> str | None:
        """Why a compiled backbone went back to eager, if it did."""
        return getattr(self._runner("backbone"), "fallback_reason", None)

    @property
    def colour_compiled(self) -> bool:
        """Whether the augmentation's colour stage runs compiled now."""
        return bool(getattr(self._runner("colour"), "compiled", False))

    @property
    def colour_fallback(self) -> str | None:
        """Why a compiled colour stage went back to eager, if it did."""
        return getattr(self._runner("colour"), "fallback_reason", None)

    def to_device(self, batch: DecodedBatch) -> PackedImages:
        """The batch's packed images on the scoring device (moved once per chunk)."""
        return batch.packed.to(self.device, non_blocking=True)

    def score_piece(self, state: ScoringState, t: int, batch: DecodedBatch,
                    images: PackedImages | None = None) -> np.ndarray:
        """Terms of checkpoint ``t`` for the decoded samples of one chunk.

        Returns (D, len(batch), K) float32: ``α_t ⟨G_tk, g_it⟩ / ‖g_it‖`` per draw, for the
        samples ``batch.ids`` in that order. ``images``: ``batch.packed`` already on the
        device (to move a chunk once for all checkpoints).
        """
        D, K = self.draws, state.cos.shape[1]
        if len(batch) == 0:
            return np.zeros((D, 0, K), dtype=np.float32)
        images = self.to_device(batch) if images is None else images
        model, ckpt = state.models[t], self.checkpoints[t]
        n_sub = max(1, round(len(batch) / self.batch_size))
        # the piece's terms stay on the device until its last batch: one copy back per piece,
        # not a wait for the device after every batch
        out = torch.zeros((D, len(batch), K), dtype=torch.float32, device=self.device)
        # consecutive samples per scoring batch: they are each other's negatives
        with ieee_float32(self.device):  # no TF32: the scores must not depend on the device
            for sel, groups in self._calls(np.array_split(np.arange(len(batch)), n_sub)):
                sub = images.select(sel)  # padded once for every draw and view
                rows = slice(int(sel[0]), int(sel[-1]) + 1)  # array_split: consecutive
                fused = {"groups": groups} if groups > 1 else {}
                for d in range(D):
                    s = self.objective.score_batch(
                        model, state.index, sub, batch.sizes[sel], batch.ids[sel],
                        state.grads[t], seed=self.seed, epoch=ckpt.epoch, draw=d,
                        backend=self.backend, reference=self.reference, **fused)
                    out[d, rows] = (s * ckpt.lr).float()
        return out.cpu().numpy()

    def _calls(self, batches: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        """The scoring batches of a piece (consecutive positions) as objective calls: (the
        positions, how many scoring batches) per call. Where the objective fuses batches on
        this device (``fused_samples``), runs of consecutive equal-size batches go in one
        call, up to that many samples; else one batch per call. The negatives stay each
        batch's own, so the scores are the same up to rounding."""
        fused = getattr(self.objective, "fused_samples", None)
        limit = 1 if fused is None or self.reference else fused(self.device)
        calls: list[tuple[np.ndarray, int]] = []
        run: list[np.ndarray] = []
        for b in batches:
            if run and (len(b) != len(run[0]) or (len(run) + 1) * len(b) > limit):
                calls.append((np.concatenate(run), len(run)))
                run = []
            run.append(b)
        if run:
            calls.append((np.concatenate(run), len(run)))
        return calls

    def score(self, index: SampleIndex, instances: Sequence[Instance],
              check_index: bool = True) -> ScoreResult:
        """Score every sample of ``index`` in memory (terms (T, D, n, K)); for result
        directories, resumable and sharded across processes, use :func:`ffengine.trace.trace`.
        """
        if not instances:
            raise ConfigError("score needs at least one backdoor instance.")
        if check_index:
            self.run.check_index(index.hash, index.path)
        n, K, T, D = len(index), len(instances), len(self.checkpoints), self.draws
        terms = np.zeros((T, D, n, K), dtype=np.float32)
        # the decoding workers start now and decode while the checkpoints load
        batches = iter_chunks(index, self.chunks(n), workers=self.workers,
                              pin_memory=self.device.type == "cuda",
                              captions=self.objective.needs_captions)
        state = self.prepare(instances, index)
        skipped: list[tuple[int, str]] = []
        bar = tqdm(total=n, desc="score", unit="sample", disable=not self.progress)
        for batch in batches:
            skipped.extend(batch.skipped)
            if len(batch):
                images = self.to_device(batch)
                for t in range(T):
                    terms[t][:, batch.ids] = self.score_piece(state, t, batch, images)
            bar.update(len(batch) + len(batch.skipped))
        bar.close()
        scores = aggregate_draws(terms, self.aggregate,
                                 checkpoint_weights(state.cos, self.weighting))
        if skipped:
            scores[[i for i, _ in skipped]] = np.nan
        return ScoreResult(scores, terms, self.checkpoints, state.cos, skipped, self.backend,
                           self.combine)
