"""Backdoor strength and backdoor instances under a run's final checkpoint.

* Strength (``asr``): the share of triggered non-target test images whose k-NN class (k=20,
  cosine, backbone features of the clean labelled training images) is the target class;
  ``asr_untriggered`` is the same share for the same images without the trigger.
* Instance: ``x_b`` is a triggered non-target test image the backdoor maps to the target
  class (PE-I: the trigger image itself); ``x_r`` is the candidate whose head-output
  embedding is closest (cosine) to ``x_b``'s: the paper's default.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..attacks.poisoned_encoder import AttackConfig
from ..attacks.triggers import apply_trigger
from ..data.index import SampleIndex
from ..data.loader import pad_images
from ..errors import DataError
from ..models import SimCLRModel
from .instance import Instance


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    x, sizes = pad_images(images)
    if len(set(map(tuple, sizes))) > 1:
        raise DataError("images of one batch must share a size for embedding.")
    return x.float() / 255.0


@torch.no_grad()
def embed_images(model: SimCLRModel, images: list[np.ndarray], head: bool,
                 batch: int = 512) -> torch.Tensor:
    """L2-normalized backbone features (head=False) or head outputs (head=True)."""
    out = []
    for s in range(0, len(images), batch):
        x = _stack(images[s: s + batch])
        h = model.features(x)
        out.append(F.normalize(model.head(h) if head else h, dim=1))
    return torch.cat(out) if out else torch.zeros(0)


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: np.ndarray,
                k: int = 20) -> np.ndarray:
    """Majority class of the k nearest (cosine) bank rows; ties go to the nearest."""
    sims = query @ bank.T
    top = sims.topk(min(k, bank.shape[0]), dim=1).indices.numpy()
    labels = bank_labels[top]  # (Q, k), nearest first
    n_cls = int(bank_labels.max()) + 1
    votes = np.zeros((len(query), n_cls))
    for j in range(labels.shape[1]):  # earlier (nearer) neighbours break ties
        np.add.at(votes, (np.arange(len(query)), labels[:, j]), 1 + 1e-6 * (k - j))
    return votes.argmax(1)


def triggered_test_images(cfg: AttackConfig, test: SampleIndex, trigger_image: np.ndarray | None
                          ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Non-target test ids, their clean images and their triggered versions."""
    ids = np.flatnonzero((test.labels != cfg.target_class) & (test.labels >= 0))
    rng = np.random.default_rng([cfg.seed, 3])
    clean = [test.image(int(i)) for i in ids]
    if cfg.attack == "pe1":
        if trigger_image is None:
            raise DataError("PE-I's strength needs its trigger image (trigger.png).")
        # PE-I's trigger is a whole image: every "triggered" input is that image
        trig = [trigger_image for _ in ids]
    else:
        trig = [apply_trigger(img, cfg.trigger, rng) for img in clean]
    return ids, clean, trig


def knn_bank(model: SimCLRModel, bank: SampleIndex) -> tuple[torch.Tensor, np.ndarray]:
    """Normalized backbone features and labels of the labelled images of ``bank``."""
    model.eval()
    good = np.flatnonzero(bank.labels >= 0)
    return embed_images(model, [bank.image(int(i)) for i in good], head=False), bank.labels[good]


def backdoor_strength(model: SimCLRModel, cfg: AttackConfig, bank: SampleIndex,
                      test: SampleIndex, trigger_image: np.ndarray | None = None,
                      k: int = 20, knn: tuple[torch.Tensor, np.ndarray] | None = None) -> dict:
    """``asr`` and ``asr_untriggered`` (see the module docstring). ``knn``: the output of
    :func:`knn_bank`, when the caller already has it."""
    model.eval()
    feats, labels = knn if knn is not None else knn_bank(model, bank)
    _, clean, trig = triggered_test_images(cfg, test, trigger_image)
    pred_t = knn_predict(embed_images(model, trig, head=False), feats, labels, k)
    pred_c = knn_predict(embed_images(model, clean, head=False), feats, labels, k)
    return {"asr": float(np.mean(pred_t == cfg.target_class)),
            "asr_untriggered": float(np.mean(pred_c == cfg.target_class)),
            "n_test": len(clean), "knn_k": k}


def find_instance(model: SimCLRModel, cfg: AttackConfig, bank: SampleIndex, test: SampleIndex,
                  trigger_image: np.ndarray | None = None, k: int = 20,
                  knn: tuple[torch.Tensor, np.ndarray] | None = None) -> Instance:
    """The paper's default instance: a triggered test image the backdoor took, and the
    closest clean test image to it in embedding space as ``x_r``."""
    model.eval()
    ids, clean, trig = triggered_test_images(cfg, test, trigger_image)
    bank_feats, bank_labels = knn if knn is not None else knn_bank(model, bank)
    pred = knn_predict(embed_images(model, trig, head=False), bank_feats, bank_labels, k)
    hits = np.flatnonzero(pred == cfg.target_class)
    order = np.random.default_rng([cfg.seed, 4]).permutation(len(ids))
    hit_set = set(hits.tolist())
    pick = next((j for j in order if j in hit_set), order[0])
    return instance_with_nearest_reference(
        test, ids, trig, pred, pick, cfg, lambda imgs: embed_images(model, imgs, head=True),
        "x_b_knn_class")


def instance_with_nearest_reference(test: SampleIndex, ids: np.ndarray,
                                    triggered: list[np.ndarray], pred: np.ndarray, pick: int,
                                    cfg, embed, class_key: str) -> Instance:
    """The instance whose ``x_b`` is ``triggered[pick]`` (from test sample ``ids[pick]``) and
    whose ``x_r`` is the other test image closest to it under ``embed`` (images ->
    L2-normalized embeddings, (N, d)): shared by the SimCLR and CLIP paths."""
    x_b = triggered[pick]
    pool = [j for j in range(len(test)) if j != int(ids[pick])]
    sims = (embed([test.image(j) for j in pool]) @ embed([x_b]).T).squeeze(1)
    best = int(sims.argmax())
    r = pool[best]
    meta = {
        "x_b_source": test.key(int(ids[pick])),
        "x_b_label": int(test.labels[ids[pick]]),
        class_key: int(pred[pick]),
        "x_r_source": test.key(r),
        "x_r_label": int(test.labels[r]),
        "cos": float(sims[best]),
        "attack": cfg.to_dict(),
        "backdoor_took_on_x_b": bool(pred[pick] == cfg.target_class),
    }
    return Instance(x_b, test.image(r), meta)
