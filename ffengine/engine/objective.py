"""The pre-training objective as the scoring engine sees it: a small interface, so the same
Engine / trace machinery (chunks, checkpoints, draws, resume, sharding) scores SimCLR and
CLIP runs alike.

An objective answers these questions for the run it belongs to (5 and 6 optional):

1. ``load_model(ckpt, device)``: the model of a checkpoint, eval mode, ``f(x)`` its embedding.
2. ``cosine_gradients(model, x_b, x_r)``: the K stacked cosine gradients
   ``{parameter name: (K, *shape)}`` (Linear layout) over the scored parameters and
   ``cos (K,)``; ``x_b``, ``x_r`` are K (3, H, W) float images in [0, 1].
3. ``score_batch(model, index, images, sizes, ids, grads, *, seed, epoch, draw, backend,
   reference)``: the (B, K) normalized scores ``⟨G_k, g_i⟩ / ‖g_i‖`` of one scoring batch
   (the batch members are each other's negatives), unweighted by the learning rate.
   ``images`` :class:`~ffengine.data.packed.PackedImages` on the device (or a padded
   (B, 3, Hmax, Wmax) uint8 tensor; both go to ``augment_batch``), ``sizes`` (B, 2), ``ids`` (B,)
   sample ids of ``index`` (the objective reads what else it needs, e.g. captions).
4. ``views``: views per sample and draw (SimCLR 2, CLIP 1); ``draws_matter``: whether more
   than one draw changes anything (CLIP's scoring view is deterministic); ``needs_captions``:
   whether a sample without a readable caption is skipped when its batch is decoded;
   ``compilable``: whether the backbone forward runs through a swappable ``backbone``
   (:class:`~ffengine.engine.compiled_backbone.BackboneRunner`) that may compile it, and the
   views' colour stage through a swappable ``colour``
   (:class:`~ffengine.engine.compiled_backbone.ColourRunner`), compiled with it.
5. Optional ``scoring_model(model)``: the loaded model in the form the fast path scores
   with (SimCLR folds the backbone's batch norms into its convolutions): the same outputs
   up to float32 rounding, faster. The reference (``Engine(reference=True)``) scores the
   model as loaded.
6. Optional ``fused_samples(device)``: how many samples one ``score_batch`` call may take
   on ``device`` as several consecutive scoring batches of equal size (its ``groups``
   keyword), each batch its own negatives; objectives without it get one batch per call.

:func:`objective_for` picks the objective from the run manifest's ``objective.name``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from ..data.packed import Images
from ..errors import ConfigError


class Objective(Protocol):
    name: str
    views: int
    draws_matter: bool
    needs_captions: bool
    compilable: bool

    def load_model(self, ckpt: Any, device: torch.device | str = "cpu") -> torch.nn.Module: ...

    def cosine_gradients(self, model: torch.nn.Module, x_b: Sequence[torch.Tensor],
                         x_r: Sequence[torch.Tensor]
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...

    def score_batch(self, model: torch.nn.Module, index: Any, images: Images,
                    sizes: np.ndarray, ids: np.ndarray, grads: dict[str, torch.Tensor], *,
                    seed: int, epoch: int, draw: int, backend: str | None,
                    reference: bool) -> torch.Tensor: ...


def objective_for(run: Any) -> Objective:
    """The objective of a run, from its manifest: ``nt_xent`` (SimCLR) or ``clip_infonce``."""
    name = run.manifest.get("objective", {}).get("name")
    if name == "nt_xent":
        from .simclr_objective import SimclrObjective

        return SimclrObjective(run)
    if name == "clip_infonce":
        from .clip_objective import ClipObjective

        return ClipObjective(run)
    raise ConfigError(f"run {run.path} has objective {name!r}; ffengine scores 'nt_xent' "
                      "(SimCLR) and 'clip_infonce' (CLIP) runs.")


__all__ = ["Objective", "objective_for"]
