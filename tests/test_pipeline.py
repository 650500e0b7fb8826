"""The whole path on small real data: poison, pre-train (manifest, resume, hash refusal),
score (engine == reference), trace, eval, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ffengine.attacks.poisoned_encoder import AttackConfig, poison_dataset
from ffengine.cli import main
from ffengine.data.demo_data import demo_index
from ffengine.data.index import SampleIndex, index_arrays
from ffengine.engine.backdoor import find_instance
from ffengine.engine.scoring import Engine
from ffengine.errors import ConfigError, ManifestMismatchError
from ffengine.pretrain.simclr import PretrainConfig, pretrain
from ffengine.run import Run

TINY = PretrainConfig(model="tiny", epochs=2, batch_size=32, ckpt_every=1, seed=3)


def _subset(split: str, n: int, out):
    src = demo_index(split)
    return index_arrays([src.image(i) for i in range(n)], out, labels=src.labels[:n],
                        keys=[src.key(i) for i in range(n)])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Real CIFAR-10 images: 96 clean, 60 auxiliary, 40 test; PE-II at 10%."""
    root = tmp_path_factory.mktemp("small")
    clean = _subset("train", 96, root / "clean")
    aux = _subset("aux", 60, root / "aux")
    test = _subset("test", 40, root / "test")
    cfg = AttackConfig(poison_rate=0.1, target_class=9)
    truth = poison_dataset(clean, aux, root / "data", cfg)
    index = SampleIndex(root / "data" / "index")
    run = pretrain(index, root / "run", TINY, progress=False)
    return {"root": root, "clean": clean, "aux": aux, "test": test, "cfg": cfg,
            "truth": truth, "index": index, "run": run}


def test_manifest_round_trip(small):
    run = Run(small["root"] / "run")
    m = run.manifest
    assert [c.epoch for c in run.checkpoints] == [1, 2]
    assert all(c.lr == pytest.approx(1e-3) for c in run.checkpoints)
    assert run.index_hash == small["index"].hash
    assert m["model"]["widths"] == [8, 16] and m["objective"]["temperature"] == 0.5
    assert run.augment.scale == (0.2, 1.0)
    for c in run.checkpoints:
        assert c.weights.exists() and c.optimizer.exists()
        state = load_file(str(c.weights))
        model = run.load_model(c)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k])
        opt = torch.load(c.optimizer, weights_only=True)
        assert opt["param_groups"][0]["lr"] == pytest.approx(1e-3)


def test_resume_equals_uninterrupted(small, tmp_path):
    """Stopping after epoch 1 and resuming gives the same weights as one straight run."""
    pretrain(small["index"], tmp_path / "r", TINY, progress=False, max_epochs_this_call=1)
    assert [c.epoch for c in Run(tmp_path / "r").checkpoints] == [1]
    resumed = pretrain(small["index"], tmp_path / "r", TINY, progress=False)
    straight = small["run"]
    a = load_file(str(resumed.checkpoints[-1].weights))
    b = load_file(str(straight.checkpoints[-1].weights))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_resume_refuses_other_settings(small, tmp_path):
    pretrain(small["index"], tmp_path / "r", TINY, progress=False, max_epochs_this_call=1)
    other = PretrainConfig(model="tiny", epochs=2, batch_size=16, ckpt_every=1, seed=3)
    with pytest.raises(ManifestMismatchError, match="training settings"):
        pretrain(small["index"], tmp_path / "r", other, progress=False)


def test_scoring_refuses_an_index_with_another_hash(small):
    inst = find_instance(small["run"].load_model(small["run"].checkpoints[-1]), small["cfg"],
                         small["clean"], small["test"])
    with pytest.raises(ManifestMismatchError, match="hash"):
        Engine(small["run"], progress=False).score(small["clean"], [inst])


def test_engine_fast_path_equals_reference_engine(small):
    model = small["run"].load_model(small["run"].checkpoints[-1])
    inst = find_instance(model, small["cfg"], small["clean"], small["test"])
    kw = dict(progress=False, batch_size=24, draws=2)
    fast = Engine(small["run"], **kw).score(small["index"], [inst, inst])
    ref = Engine(small["run"], reference=True, **kw).score(small["index"], [inst, inst])
    assert fast.terms.shape == (2, 2, len(small["index"]), 2)
    scale = np.abs(ref.terms).max()
    assert scale > 0
    assert np.abs(fast.terms - ref.terms).max() <= 1e-5 * scale
    np.testing.assert_array_equal(fast.scores[:, 0], fast.scores[:, 1])
    # the score is the learning-rate-weighted sum over checkpoints, mean over draws
    np.testing.assert_allclose(fast.scores[:, 0], fast.terms[..., 0].sum(0).mean(0),
                               rtol=1e-5, atol=1e-12)


def test_engine_checkpoint_selection(small):
    assert [c.epoch for c in Engine(small["run"], checkpoints="last").checkpoints] == [2]
    with pytest.raises(ConfigError, match="epoch"):
        Engine(small["run"], checkpoints=[7])


def test_cli_end_to_end(small, tmp_path, capsys):
    root = small["root"]
    data, run, inst, out = tmp_path / "data", tmp_path / "run", tmp_path / "inst", tmp_path / "t"

    def call(*args):
        assert main([str(a) for a in args]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    p = call("poison", "--clean", root / "clean", "--aux", root / "aux", "-o", data,
             "--poison-rate", "0.1", "--json", "--quiet")
    assert p["n_poisoned"] == 10 and p["n"] == 106
    call("pretrain", "--index", data / "index", "-o", run, "--model", "tiny", "--epochs", 1,
         "--batch-size", 32, "--json", "--quiet")
    i = call("instance", "--run", run, "--data", data, "--bank", root / "clean", "--test",
             root / "test", "-o", inst, "--json", "--quiet")
    assert {"asr", "asr_untriggered"} <= set(i["strength"])
    t = call("trace", "--run", run, "--index", data / "index", "--instance", inst, "-o", out,
             "--json", "--quiet")
    assert t["n"] == 106
    for f in ("scores.npy", "terms.npy", "flagged.npy", "domains.txt", "scores.png",
              "summary.json", "metadata.json"):
        assert (out / f).stat().st_size > 0
    e = call("eval", "--truth", data / "truth.json", out, "--json")
    assert {"dacc", "fpr", "fnr", "auc", "n", "n_poisoned", "n_flagged"} <= set(e)
    assert e["n_poisoned"] == 10 and e["n_flagged"] == t["n_flagged"]


def test_cli_errors_exit_1_with_one_line(tmp_path, capsys):
    assert main(["trace", "--run", str(tmp_path), "--index", str(tmp_path), "--instance",
                 str(tmp_path), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run directory" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["trace"])
    assert e.value.code == 2
