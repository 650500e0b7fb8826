"""The scoring engine: ``Engine(run).score(index, instances)``.

For every pre-training input ``x_i`` and backdoor instance ``k`` (DESIGN.md §2)::

    s_ik = Σ_t α_t ⟨G_tk, g_it⟩ / ‖g_it‖

The backbone runs once per view, checkpoint and draw without an autograd graph however
many instances there are; the head's per-sample signals feed the ghost algebra
(:mod:`ffengine.engine.head`). Per-(checkpoint, draw) terms are kept in ``terms``
(T, D, n, K) so aggregations over draws and checkpoint subsets need no re-scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.augment import augment_batch, stream_id
from ..data.index import SampleIndex
from ..data.loader import iter_decoded
from ..errors import ConfigError
from ..ops.ghost_score import resolve_backend
from ..run import Checkpoint, Run
from ..reference.scoring import score_batch_reference
from .cosine import cosine_gradients
from .head import ghost_terms, head_signals, normalized_scores, scored_modules
from .instance import Instance

SCORE_STREAM = 1  # purpose tag of scoring views in the augmentation streams
AGGREGATES = ("mean", "max", "median")


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

    @property
    def detection_scores(self) -> np.ndarray:
        """One score per sample for the MAD rule: the mean over instances."""
        return self.scores.mean(axis=1)


def aggregate_draws(terms: np.ndarray, how: str) -> np.ndarray:
    """(T, D, n, K) terms -> (n, K) scores: sum over checkpoints, then ``how`` over draws."""
    per_draw = terms.sum(axis=0, dtype=np.float64)  # (D, n, K)
    if how == "mean":
        out = per_draw.mean(axis=0)
    elif how == "max":
        out = per_draw.max(axis=0)
    elif how == "median":
        out = np.median(per_draw, axis=0)
    else:
        raise ConfigError(f"aggregate {how!r} is unknown; expected one of {AGGREGATES}.")
    return out.astype(np.float32)


class Engine:
    """Scores pre-training inputs against backdoor instances with a run's checkpoints.

    Args:
        run: a :class:`Run` or its directory.
        checkpoints: "all", "last", or a list of epochs to use.
        device: where the model runs.
        backend: ghost-score backend, ``auto|torch|cpu|triton|cuda``.
        draws: augmentation draws per sample and checkpoint (the paper: 1).
        aggregate: how per-draw scores combine: mean, max or median.
        batch_size: scoring batch (the negatives); default: the pre-training batch size.
        seed: seeds the sample order and the scoring views.
        reference: score with the slow per-sample autograd reference instead of the ghost
            fast path (same batches, views and negatives): for tests and audits.
    """

    def __init__(self, run: Run | str | Path, checkpoints: str | Sequence[int] = "all",
                 device: torch.device | str = "cpu", backend: str | None = "auto",
                 draws: int = 1, aggregate: str = "mean", batch_size: int | None = None,
                 seed: int = 0, chunk_batches: int = 16, workers: int = 0,
                 progress: bool = True, reference: bool = False):
        self.run = run if isinstance(run, Run) else Run(run)
        self.device = torch.device(device)
        self.backend = resolve_backend(backend)
        if draws < 1:
            raise ConfigError(f"draws must be at least 1, got {draws}.")
        if aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate {aggregate!r} is unknown; expected {AGGREGATES}.")
        self.draws, self.aggregate, self.seed = draws, aggregate, seed
        self.batch_size = batch_size or int(self.run.manifest["training"]["batch_size"])
        self.chunk_batches, self.workers, self.progress = chunk_batches, workers, progress
        self.reference = reference
        self.checkpoints = self._select(checkpoints)

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

    def score(self, index: SampleIndex, instances: Sequence[Instance],
              check_index: bool = True) -> ScoreResult:
        if not instances:
            raise ConfigError("score needs at least one backdoor instance.")
        if check_index:
            self.run.check_index(index.hash, index.path)
        n, K, T, D = len(index), len(instances), len(self.checkpoints), self.draws
        terms = np.zeros((T, D, n, K), dtype=np.float32)
        layers = self.run.scored_layers
        models, grads, cos = [], [], np.zeros((T, K), dtype=np.float32)
        xb = [inst.tensors(self.device)[0] for inst in instances]
        xr = [inst.tensors(self.device)[1] for inst in instances]
        for t, ckpt in enumerate(self.checkpoints):
            model = self.run.load_model(ckpt, self.device)
            g, c = cosine_gradients(model, xb, xr, layers)
            models.append(model)
            grads.append(g)
            cos[t] = c.cpu().numpy()

        order = np.random.default_rng([self.seed, 7]).permutation(n)
        chunk = self.batch_size * self.chunk_batches
        skipped: list[tuple[int, str]] = []
        aug = self.run.augment
        tau = self.run.temperature
        bar = tqdm(total=n, desc="score", unit="sample", disable=not self.progress)
        for batch in iter_decoded(index, order, chunk, workers=self.workers,
                                  pin_memory=self.device.type == "cuda"):
            skipped.extend(batch.skipped)
            if len(batch) == 0:
                bar.update(len(batch.skipped))
                continue
            images = batch.images.to(self.device, non_blocking=True)
            n_sub = max(1, round(len(batch) / self.batch_size))
            subsets = np.array_split(np.arange(len(batch)), n_sub)
            for t, (model, ckpt) in enumerate(zip(models, self.checkpoints, strict=True)):
                mods = scored_modules(model, layers)
                for d in range(D):
                    feats = self._view_features(model, images, batch.sizes, batch.ids,
                                                ckpt.epoch, d, aug)
                    for sel in subsets:
                        f = torch.cat([feats[0][sel], feats[1][sel]])
                        if self.reference:
                            s = score_batch_reference(model, f, grads[t], layers, tau)
                        else:
                            sig = head_signals(model.head, f, mods, tau)
                            dots, sq = ghost_terms(sig, grads[t], views=2,
                                                   backend=self.backend)
                            s = normalized_scores(dots, sq)
                        s = s * ckpt.lr
                        terms[t, d, batch.ids[sel]] = s.float().cpu().numpy()
            bar.update(len(batch) + len(batch.skipped))
        bar.close()
        scores = aggregate_draws(terms, self.aggregate)
        if skipped:
            scores[[i for i, _ in skipped]] = np.nan
        return ScoreResult(scores, terms, self.checkpoints, cos, skipped, self.backend)

    def _view_features(self, model, images, sizes, ids, epoch: int, draw: int, aug
                       ) -> list[torch.Tensor]:
        """Backbone features of both views of every image, no autograd graph."""
        out = []
        with torch.no_grad():
            for v in (0, 1):
                x = augment_batch(images, sizes, ids, self.seed,
                                  stream_id(SCORE_STREAM, epoch, draw, v), aug)
                feats = [model.features(x[s: s + 512]) for s in range(0, len(x), 512)]
                out.append(torch.cat(feats))
        return out
