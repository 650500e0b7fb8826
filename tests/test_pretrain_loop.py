"""The shared epoch loop's bookkeeping: checkpoints carry the training seconds behind them,
summed over a resume, so an interrupted run reports its whole training time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ffengine.pretrain import loop


def _run(monkeypatch, start_epoch, max_epochs, train_s, seconds_per_batch=10.0):
    clock = [1000.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])

    def train_batch(sel, epoch):
        clock[0] += seconds_per_batch  # each step takes a known time on the fake clock
        return 0.0

    saved = []
    cfg = SimpleNamespace(epochs=3, ckpt_every=1, batch_size=4, lr=1e-3, schedule="constant",
                          seed=0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loop.train_epochs(cfg, model, opt, 8, start_epoch, 0, max_epochs, train_batch,
                      lambda epoch, step, lr, t: saved.append((epoch, t)), "test", False,
                      train_s=train_s)
    return saved


def test_checkpoints_carry_the_training_seconds_behind_them_across_a_resume(monkeypatch):
    # 8 samples in batches of 4: two steps of 10 s an epoch
    first = _run(monkeypatch, 1, 2, 0.0)
    assert first == [(1, pytest.approx(20.0)), (2, pytest.approx(40.0))]
    resumed = _run(monkeypatch, 3, None, first[-1][1])
    assert resumed == [(3, pytest.approx(60.0))]


def test_unknown_seconds_stay_unknown(monkeypatch):
    # resumed from a checkpoint that did not record them: no partial figure is written
    assert _run(monkeypatch, 2, None, None) == [(2, None), (3, None)]
