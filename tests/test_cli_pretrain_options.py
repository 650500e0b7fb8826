"""`ffengine pretrain`: options left unset take the chosen modality's defaults, and an option
of the other modality is refused, not silently ignored."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import ffengine.data.index as index_mod
import ffengine.pretrain.clip as clip_mod
import ffengine.pretrain.simclr as simclr_mod
from ffengine.cli import main


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake(kind):
        def run(index, out, cfg, **kw):
            seen[kind] = cfg
            return SimpleNamespace(path=out, checkpoints=[])
        return run

    monkeypatch.setattr(index_mod, "SampleIndex", lambda path: path)
    monkeypatch.setattr(clip_mod, "pretrain_clip", fake("clip"))
    monkeypatch.setattr(simclr_mod, "pretrain", fake("simclr"))
    return seen


def test_unset_options_take_each_modalitys_defaults(captured, tmp_path):
    args = ["pretrain", "--index", str(tmp_path), "-o", str(tmp_path / "r"), "--quiet"]
    assert main(args + ["--modality", "clip"]) == 0
    assert captured["clip"] == clip_mod.ClipPretrainConfig()
    assert main(args) == 0
    assert captured["simclr"] == simclr_mod.PretrainConfig()
    assert main(args + ["--modality", "clip", "--epochs", "3", "--schedule", "constant",
                        "--ckpt-every", "1", "--weight-decay", "0.2"]) == 0
    c = captured["clip"]
    assert (c.epochs, c.schedule, c.ckpt_every, c.weight_decay) == (3, "constant", 1, 0.2)
    assert main(args + ["--temperature", "0.2", "--model", "tiny"]) == 0
    assert (captured["simclr"].temperature, captured["simclr"].model) == (0.2, "tiny")


def test_simclr_temperature_with_clip_is_an_error(captured, tmp_path, capsys):
    assert main(["pretrain", "--index", str(tmp_path), "-o", str(tmp_path / "r"),
                 "--modality", "clip", "--temperature", "0.2"]) == 1
    assert "CLIP learns its temperature" in capsys.readouterr().err
    assert "clip" not in captured
