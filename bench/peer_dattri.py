"""Peer check: ffengine's scores against dattri's ``TracInAttributor`` on the same samples.

    pip install dattri          # a bench-only extra, never a runtime dependency
    python bench/peer_dattri.py --run RUN --index INDEX --instance DIR --json

dattri is set up to compute exactly Eq. 5 (DESIGN.md §2): the training "loss" of a sample
is its own NT-Xent term inside its scoring batch (the other batch members detached: every
data item carries its batch's views and a one-hot of its position), the target is
``ℓ_cos = -cos(f(x_b), f(x_r))``, the gradients are taken over the run's scored layers with
the whole model in the forward, the weight of checkpoint ``t`` is ``α_t · ‖G_t‖``
(dattri normalizes the target's gradient too, ffengine does not), and dattri's default
random projection of the gradients is switched off. The views are the
engine's own (same seed, checkpoint and draw), so the scores must agree to float32
rounding. Prints the largest relative difference and both wall times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def _loss_fn(model, tau):
    from torch.func import functional_call

    from ffengine.losses import nt_xent_sample_loss_onehot

    def loss(params, data):
        views, onehot = data  # (2B, 3, H, W), (B,): this item's batch and its position
        return nt_xent_sample_loss_onehot(functional_call(model, params, (views,)), onehot,
                                          tau)

    return loss


def _target_fn(model):
    from torch.func import functional_call

    def target(params, data):
        xb, xr = data
        zb = functional_call(model, params, (xb.unsqueeze(0),))
        zr = functional_call(model, params, (xr.unsqueeze(0),))
        return -torch.nn.functional.cosine_similarity(zb, zr, dim=1).squeeze(0)

    return target


def main(argv: list[str] | None = None) -> int:
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    from ffengine.data.augment import augment_batch, stream_id
    from ffengine.data.index import SampleIndex
    from ffengine.data.loader import iter_chunks
    from ffengine.engine.instance import load_instance
    from ffengine.engine.scoring import Engine
    from ffengine.engine.simclr_objective import SCORE_STREAM

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--instance", required=True)
    p.add_argument("--checkpoints", default="last", help="last, all or epochs like 60,75")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    ckpts = a.checkpoints if a.checkpoints in ("all", "last") else [
        int(x) for x in a.checkpoints.split(",")]
    engine = Engine(a.run, checkpoints=ckpts, batch_size=a.batch_size, progress=False)
    obj = engine.objective
    index = SampleIndex(a.index)
    inst = load_instance(a.instance)
    state = engine.prepare([inst], index)
    ids = np.arange(min(a.samples, len(index)))
    (batch,) = list(iter_chunks(index, [ids]))
    batches = np.array_split(np.arange(len(batch)), max(1, len(batch) // a.batch_size))
    ours = np.zeros(len(batch))
    theirs = np.zeros(len(batch))
    t_ours = t_theirs = 0.0
    xb, xr = inst.tensors()
    for t, ckpt in enumerate(engine.checkpoints):
        model, grads = state.models[t], state.grads[t]
        g_norm = float(torch.sqrt(sum((g[0].double() ** 2).sum() for g in grads.values())))
        layers = list(grads)
        for sel in batches:
            t0 = time.perf_counter()
            s = obj.score_batch(model, index, batch.packed.select(sel), batch.sizes[sel],
                                batch.ids[sel], grads, seed=engine.seed, epoch=ckpt.epoch,
                                draw=0, backend="torch", reference=False)
            t_ours += time.perf_counter() - t0
            ours[sel] += ckpt.lr * s[:, 0].double().numpy()
            # the engine's views of this batch, as one data item per sample
            views = torch.cat([augment_batch(batch.packed.select(sel), batch.sizes[sel],
                                             batch.ids[sel], engine.seed,
                                             stream_id(SCORE_STREAM, ckpt.epoch, 0, v),
                                             obj.augment) for v in (0, 1)])
            b = len(sel)
            train = TensorDataset(views.unsqueeze(0).expand(b, *views.shape),
                                  torch.eye(b))
            test = TensorDataset(xb.unsqueeze(0), xr.unsqueeze(0))
            task = AttributionTask(loss_func=_loss_fn(model, obj.temperature), model=model,
                                   checkpoints=model.state_dict(),
                                   target_func=_target_fn(model))
            attr = TracInAttributor(task, weight_list=torch.tensor([ckpt.lr * g_norm]),
                                    normalized_grad=True, layer_name=layers)
            # dattri 0.3 replaces projector_kwargs=None by a 512-d random projection, which
            # only approximates the dot products: switch it off for exact gradients
            attr.projector_kwargs = None
            t0 = time.perf_counter()
            out = attr.attribute(DataLoader(train, batch_size=b), DataLoader(test,
                                                                              batch_size=1))
            t_theirs += time.perf_counter() - t0
            theirs[sel] += out[:, 0].double().numpy()
    scale = np.abs(ours).max()
    res = {"samples": len(batch), "checkpoints": [c.epoch for c in engine.checkpoints],
           "max_abs_diff_over_max": float(np.abs(ours - theirs).max() / scale),
           "ffengine_s": round(t_ours, 3), "dattri_s": round(t_theirs, 3),
           "speed_ratio": round(t_theirs / t_ours, 1)}
    print(json.dumps(res, sort_keys=True) if a.json else json.dumps(res, indent=2))
    return 0 if res["max_abs_diff_over_max"] < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
