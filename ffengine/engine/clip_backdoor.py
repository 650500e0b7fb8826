"""CLIP backdoor strength (zero-shot) and backdoor instances.

* Zero-shot classifier: each class's text embedding is the normalized mean of its 80 prompt
  embeddings (CLIP's prompt ensembling); an image goes to the class of highest cosine.
* Strength: ``asr`` is the share of triggered non-target test images classified as the
  target label, ``asr_untriggered`` the share for the same images without the trigger;
  ``zero_shot_acc`` the clean accuracy on all labelled test images.
* Instance: ``x_b`` a triggered non-target test image the backdoor took (zero-shot target),
  ``x_r`` the clean test image (not ``x_b``'s source) whose image embedding is closest
  (cosine) to ``x_b``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..attacks.clip_attacks import ClipAttackConfig, trigger_image
from ..data.captions import class_prompts
from ..data.index import SampleIndex
from ..data.loader import pad_images
from ..models.clip import ClipModel
from .backdoor import instances_with_nearest_reference, pick_order
from .clip_objective import model_inputs
from .instance import Instance


@torch.no_grad()
def embed_images(model: ClipModel, images: Sequence[np.ndarray], batch: int = 256
                 ) -> torch.Tensor:
    """(N, embed_dim) L2-normalized image embeddings of (H, W, 3) uint8 images."""
    out = []
    dev = next(model.parameters()).device
    for s in range(0, len(images), batch):
        x, sizes = pad_images(list(images[s: s + batch]))
        ids = np.arange(s, s + len(sizes))
        out.append(F.normalize(model.encode_image(model_inputs(model, x.to(dev), sizes, ids)),
                               dim=1))
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def zero_shot_weights(model: ClipModel, class_names: Sequence[str]) -> torch.Tensor:
    """(C, embed_dim) normalized class embeddings from the 80 prompt templates."""
    dev = next(model.parameters()).device
    rows = []
    for name in class_names:
        t = F.normalize(model.encode_text(model.tokenize(class_prompts(name)).to(dev)), dim=1)
        rows.append(F.normalize(t.mean(0), dim=0))
    return torch.stack(rows)


def zero_shot_predict(model: ClipModel, images: Sequence[np.ndarray],
                      weights: torch.Tensor) -> np.ndarray:
    return (embed_images(model, images) @ weights.T).argmax(1).cpu().numpy()


def _triggered(cfg: ClipAttackConfig, test: SampleIndex
               ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    ids = np.flatnonzero((test.labels != cfg.target_class) & (test.labels >= 0))
    clean = [test.image(int(i)) for i in ids]
    # image seeds past any poison's, so test triggers are not the poisons' draws
    trig = [trigger_image(cfg, img, 1_000_000 + int(i)) for img, i in zip(clean, ids,
                                                                             strict=True)]
    return ids, clean, trig


def clip_backdoor_strength(model: ClipModel, cfg: ClipAttackConfig, test: SampleIndex,
                           class_names: Sequence[str]) -> dict:
    """``asr``, ``asr_untriggered`` and ``zero_shot_acc`` (see the module docstring)."""
    model.eval()
    w = zero_shot_weights(model, class_names)
    _, clean, trig = _triggered(cfg, test)
    pred_t = zero_shot_predict(model, trig, w)
    pred_c = zero_shot_predict(model, clean, w)
    good = np.flatnonzero(test.labels >= 0)
    pred_all = zero_shot_predict(model, [test.image(int(i)) for i in good], w)
    return {"asr": float(np.mean(pred_t == cfg.target_class)),
            "asr_untriggered": float(np.mean(pred_c == cfg.target_class)),
            "zero_shot_acc": float(np.mean(pred_all == test.labels[good])),
            "n_test": len(clean)}


def find_clip_instance(model: ClipModel, cfg: ClipAttackConfig, test: SampleIndex,
                       class_names: Sequence[str]) -> Instance:
    """The default instance (see the module docstring); a random triggered image when the
    backdoor took none (``meta["backdoor_took_on_x_b"]`` says which)."""
    return find_clip_instances(model, cfg, test, class_names, 1)[0]


def find_clip_instances(model: ClipModel, cfg: ClipAttackConfig, test: SampleIndex,
                        class_names: Sequence[str], count: int = 1) -> list[Instance]:
    """``count`` instances from different triggered test images, those the backdoor took
    first."""
    model.eval()
    ids, _, trig = _triggered(cfg, test)
    pred = zero_shot_predict(model, trig, zero_shot_weights(model, class_names))
    picks = pick_order(pred == cfg.target_class, np.random.default_rng([cfg.seed, 4]), count)
    return instances_with_nearest_reference(test, ids, trig, pred, picks, cfg,
                                            lambda imgs: embed_images(model, imgs),
                                            "x_b_zero_shot_class")


__all__ = ["clip_backdoor_strength", "embed_images", "find_clip_instance", "find_clip_instances",
           "zero_shot_predict", "zero_shot_weights"]
