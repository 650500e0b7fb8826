"""Backdoor strength and backdoor instances under a run's final checkpoint.

* Strength (``asr``): the share of triggered non-target test images whose k-NN class (k=20,
  cosine, backbone features of the clean labelled training images) is the target class;
  ``asr_untriggered`` is the same share for the same images without the trigger.
* Instance: ``x_b`` is a triggered non-target test image the backdoor maps to the target
  class (PE-I: the trigger image itself); ``x_r`` is the candidate whose head-output
  embedding is closest (cosine) to ``x_b``'s among the images of the class x_b is
  classified as (another class than its own: see
  :func:`instances_with_nearest_reference`).
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
                  knn: tuple[torch.Tensor, np.ndarray] | None = None,
                  trigger_label: int | None = None) -> Instance:
    """The paper's default instance: a triggered test image the backdoor took, and the
    closest semantically different clean test image to it in embedding space as ``x_r``."""
    return find_instances(model, cfg, bank, test, trigger_image, 1, k, knn, trigger_label)[0]


def find_instances(model: SimCLRModel, cfg: AttackConfig, bank: SampleIndex,
                   test: SampleIndex, trigger_image: np.ndarray | None = None, count: int = 1,
                   k: int = 20, knn: tuple[torch.Tensor, np.ndarray] | None = None,
                   trigger_label: int | None = None) -> list[Instance]:
    """``count`` instances from different triggered test images the backdoor took (in a
    seeded order; images it did not take fill up when too few took).

    PE-I has one ``x_b``, the trigger image, so it gives one instance whatever ``count``;
    ``trigger_label`` (the trigger image's class, ``truth["pe1_trigger_label"]``) keeps
    ``x_r`` out of that class.
    """
    model.eval()
    ids, _, trig = triggered_test_images(cfg, test, trigger_image)
    bank_feats, bank_labels = knn if knn is not None else knn_bank(model, bank)
    pred = knn_predict(embed_images(model, trig, head=False), bank_feats, bank_labels, k)
    xb_labels = test.labels[ids]
    if cfg.attack == "pe1":
        if trigger_label is None:
            raise DataError("PE-I's instance needs the trigger image's class "
                            "(truth.json's pe1_trigger_label) to pick x_r from another one.")
        count, xb_labels = 1, np.full(len(ids), int(trigger_label))
    picks = pick_order(pred == cfg.target_class, np.random.default_rng([cfg.seed, 4]), count)
    return instances_with_nearest_reference(
        test, ids, trig, pred, picks, cfg, lambda imgs: embed_images(model, imgs, head=True),
        "x_b_knn_class", xb_labels)


def pick_order(took: np.ndarray, rng: np.random.Generator, count: int) -> list[int]:
    """The first ``count`` positions of a seeded permutation, those where ``took`` first."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}.")
    order = rng.permutation(len(took))
    ranked = [int(j) for j in order if took[j]] + [int(j) for j in order if not took[j]]
    return ranked[:count]


def instances_with_nearest_reference(test: SampleIndex, ids: np.ndarray,
                                     triggered: list[np.ndarray], pred: np.ndarray,
                                     picks: list[int], cfg, embed, class_key: str,
                                     xb_labels: np.ndarray | None = None) -> list[Instance]:
    """One instance per ``picks`` position: ``x_b`` is ``triggered[pick]`` (test sample
    ``ids[pick]``) and ``x_r`` the clean test image closest to it under ``embed`` (images ->
    L2-normalized embeddings, (N, d)) among those of the class ``pred`` maps ``x_b`` to:
    the event a user catches is "x_b lands among class-c inputs", and ``x_r`` is the
    nearest of them. Where ``pred`` is ``x_b``'s own class (the backdoor did not take on
    it) or the pool has no image of it, ``x_r`` comes from any *other* class (DESIGN.md
    §1: semantically different; the nearest image overall is often ``x_b``'s own class,
    and such a pair traces what makes two dogs alike, not the backdoor). ``xb_labels``:
    each ``x_b``'s class where it is not its source's (PE-I). Shared by the SimCLR and CLIP
    paths."""
    labels = test.labels
    xb_labels = labels[ids] if xb_labels is None else np.asarray(xb_labels)
    pool_all = np.flatnonzero(labels >= 0)
    pool_emb = embed([test.image(int(j)) for j in pool_all])
    xb_emb = embed([triggered[p] for p in picks])
    out = []
    for row, p in enumerate(picks):
        src = int(ids[p])
        ok = np.flatnonzero(labels[pool_all] == pred[p])
        to_pred = int(pred[p]) != int(xb_labels[p]) and len(ok) > 0
        if not to_pred:
            ok = np.flatnonzero(labels[pool_all] != xb_labels[p])
        sims = (pool_emb[ok] @ xb_emb[row]).reshape(-1)
        best = int(sims.argmax())
        r = int(pool_all[ok[best]])
        meta = {
            "x_b_source": test.key(src),
            "x_b_label": int(xb_labels[p]),
            class_key: int(pred[p]),
            "x_r_source": test.key(r),
            "x_r_label": int(labels[r]),
            "x_r_pool": "predicted-class" if to_pred else "other-class",
            "cos": float(sims[best]),
            "attack": cfg.to_dict(),
            "backdoor_took_on_x_b": bool(pred[p] == cfg.target_class),
        }
        out.append(Instance(triggered[p], test.image(r), meta))
    return out


def optimized_reference(model: SimCLRModel, x_b: np.ndarray, steps: int = 100,
                        lr: float = 1e-3, seed: int = 0) -> tuple[np.ndarray, float]:
    """The paper's random reference input (its Table 7 ablation): uniform noise optimized
    with Adam (``lr``, ``steps`` iterations, pixels kept in [0, 1]) to maximize the
    head-output cosine to ``x_b``. Returns the uint8 image and its final cosine (measured
    on the uint8 image)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    h, w = x_b.shape[:2]
    x = torch.rand(1, 3, h, w, generator=gen).requires_grad_(True)
    target = embed_images(model, [x_b], head=True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        z = F.normalize(model.head(model.features(x)), dim=1)
        loss = -(z * target).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    img = (x.detach()[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    cos = float((embed_images(model, [img], head=True) * target).sum())
    return np.ascontiguousarray(img), cos


def with_optimized_references(model: SimCLRModel, instances: list[Instance], steps: int = 100,
                              lr: float = 1e-3, seed: int = 0) -> list[Instance]:
    """The same ``x_b``s with ``x_r`` replaced by :func:`optimized_reference` (one seed per
    instance)."""
    out = []
    for j, inst in enumerate(instances):
        img, cos = optimized_reference(model, inst.x_b, steps, lr, seed + j)
        meta = {**inst.meta, "x_r_source": f"optimized noise (seed {seed + j}, {steps} Adam "
                                           f"steps, lr {lr:g})", "x_r_label": -1,
                "x_r_pool": "optimized", "cos": cos}
        out.append(Instance(inst.x_b, img, meta))
    return out
