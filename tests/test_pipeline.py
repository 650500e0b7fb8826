"""The whole path on small real data: poison, pre-train (manifest, resume, hash refusal),
score (engine == reference), trace, eval, and the CLI end to end."""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ffengine.attacks.poisoned_encoder import AttackConfig, poison_dataset
from ffengine.cli import main
from ffengine.data.demo_data import demo_index
from ffengine.data.index import SampleIndex, index_arrays
from ffengine.engine.backdoor import (
    embed_images,
    find_instance,
    find_instances,
    optimized_reference,
    pick_order,
    with_optimized_references,
)
from ffengine.engine.scoring import Engine
from ffengine.errors import ConfigError, DataError, ManifestMismatchError
from ffengine.methods import DEFAULT_METHOD, METHODS
from ffengine.pretrain.simclr import PretrainConfig, pretrain
from ffengine.run import Run

from .trace_fixture import with_cos

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
    # the training seconds add up over the resume (read back from the manifest)
    seconds = [c.train_s for c in resumed.checkpoints]
    assert len(seconds) == TINY.epochs and seconds[0] > 0
    assert all(b > a for a, b in pairwise(seconds))
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


def test_backbone_memory_format_moves_the_terms_by_rounding_only(small, monkeypatch):
    """The engine runs the backbone channels-last (measured faster, CPU included); NCHW gives
    the same terms to float32 rounding, and the channels-last pass really is channels-last."""
    from ffengine.engine import simclr_objective

    model = small["run"].load_model(small["run"].checkpoints[-1])
    inst = find_instance(model, small["cfg"], small["clean"], small["test"])
    kw = dict(progress=False, batch_size=24, draws=2, compile_backbone="off")
    seen = []
    runner = simclr_objective.BackboneRunner.__call__

    def record(self, model, x):
        seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return runner(self, model, x)

    monkeypatch.setattr(simclr_objective.BackboneRunner, "__call__", record)
    last = Engine(small["run"], **kw).score(small["index"], [inst])
    assert seen and all(seen)
    monkeypatch.setattr(simclr_objective, "backbone_memory_format",
                        lambda device: torch.contiguous_format)
    seen.clear()
    nchw = Engine(small["run"], **kw).score(small["index"], [inst])
    assert seen and not any(seen)
    scale = np.abs(nchw.terms).max()
    assert scale > 0
    assert np.abs(last.terms - nchw.terms).max() <= 1e-5 * scale


@pytest.mark.parametrize("limit", [72, 30])
def test_fused_scoring_batches_move_the_terms_by_rounding_only(small, monkeypatch, limit):
    """On a GPU the engine scores runs of equal-size scoring batches in one call (fewer
    launches): the same terms to float32 rounding, each batch keeping its own negatives.
    Forced here on the CPU: batch 24 splits the data into batches of 27, 27, 26, 26."""
    from ffengine.engine import simclr_objective

    model = small["run"].load_model(small["run"].checkpoints[-1])
    inst = find_instance(model, small["cfg"], small["clean"], small["test"])
    kw = dict(progress=False, batch_size=24, draws=2, compile_backbone="off")
    n = len(small["index"])
    sizes = [len(s) for s in np.array_split(np.arange(n), round(n / 24))]
    assert len(set(sizes)) == 2  # runs of two sizes: a fused call never mixes them
    plain = Engine(small["run"], **kw).score(small["index"], [inst, inst])
    calls = []
    score_batch = simclr_objective.SimclrObjective.score_batch

    def record(self, model, index, images, *args, **kwargs):
        calls.append((len(images), kwargs.get("groups", 1)))
        return score_batch(self, model, index, images, *args, **kwargs)

    monkeypatch.setattr(simclr_objective.SimclrObjective, "fused_samples",
                        lambda self, device: limit)
    monkeypatch.setattr(simclr_objective.SimclrObjective, "score_batch", record)
    fused = Engine(small["run"], **kw).score(small["index"], [inst, inst])
    # one chunk: for each checkpoint, for each call, both draws; the first checkpoint, draw 0
    per_call = calls[: len(calls) // len(small["run"].checkpoints)][::2]
    if limit == 72:  # 27+27 and 26+26: two calls of two batches
        assert per_call == [(2 * sizes[0], 2), (2 * sizes[-1], 2)]
    else:  # no two batches fit: one each
        assert per_call == [(s, 1) for s in sizes]
    scale = np.abs(plain.terms).max()
    assert scale > 0
    assert np.abs(fused.terms - plain.terms).max() <= 1e-5 * scale
    if limit == 30:  # unfused calls: the same code path, the same bits
        np.testing.assert_array_equal(fused.terms, plain.terms)


def test_gpu_fusion_and_backbone_batches_are_bounded_in_pixels(small):
    """On a GPU, 4,096 samples of 32x32 views per call and 2,048-view forwards; large views
    keep one batch's memory (no fusion, 512-view forwards); a CPU never fuses, and its
    forwards take 64 views of 32x32 (one of 224x224)."""
    import dataclasses

    from ffengine.engine.simclr_objective import SimclrObjective, backbone_batch

    obj = SimclrObjective(small["run"])
    assert obj.augment.size == 32
    assert obj.fused_samples("cpu") == 1 and backbone_batch("cpu", 32) == 64
    assert backbone_batch("cpu", 224) == 1 and backbone_batch("cpu", 16) == 256
    assert obj.fused_samples(torch.device("cuda")) == 4096 and backbone_batch("cuda", 32) == 2048
    obj.augment = dataclasses.replace(obj.augment, size=224)
    assert obj.fused_samples("cuda") == 83 and backbone_batch("cuda", 224) == 512
    assert backbone_batch("cuda", 64) == 512 and backbone_batch("cuda", 16) == 8192


def test_terms_do_not_depend_on_the_other_options(small):
    """A (checkpoint, draw, instance) term is the same whichever other checkpoints, draws and
    instances are scored beside it (to float32 rounding: K changes the BLAS blocking), so
    the detection harness slices one trace into methods."""
    model = small["run"].load_model(small["run"].checkpoints[-1])
    a, b = find_instances(model, small["cfg"], small["clean"], small["test"], count=2)
    kw = dict(progress=False, batch_size=24)
    full = Engine(small["run"], draws=3, **kw).score(small["index"], [a, b])
    part = Engine(small["run"], checkpoints="last", draws=2, aggregate="max",
                  **kw).score(small["index"], [b])
    scale = np.abs(full.terms).max()
    assert scale > 0
    np.testing.assert_allclose(part.terms, full.terms[-1:, :2, :, 1:], rtol=1e-5,
                               atol=1e-6 * scale)
    np.testing.assert_allclose(part.scores[:, 0], full.terms[-1, :2, :, 1].max(0), rtol=1e-5,
                               atol=1e-6 * scale)


def test_images_of_mixed_sizes_score_the_same_packed(small, tmp_path, np_rng, monkeypatch):
    """Images of many sizes stay packed and are padded in groups of similar size (not each
    scoring batch to its largest): every term is what one padded batch gives."""
    from PIL import Image

    from ffengine.data import packed as packed_module

    src = demo_index("train")
    sizes = np_rng.integers(20, 72, size=(30, 2))
    images = [np.asarray(Image.fromarray(src.image(i)).resize((int(w), int(h))))
              for i, (h, w) in enumerate(sizes)]
    index = index_arrays(images, tmp_path / "mixed")
    model = small["run"].load_model(small["run"].checkpoints[-1])
    inst = find_instance(model, small["cfg"], small["clean"], small["test"])
    engine = Engine(small["run"], batch_size=10, draws=2, progress=False)

    monkeypatch.setattr(packed_module, "MIN_GROUP_PIXELS", 1 << 40)  # one group per batch
    whole = engine.score(index, [inst], check_index=False)
    monkeypatch.setattr(packed_module, "MIN_GROUP_PIXELS", 1)
    # one chunk of 30, three scoring batches of 10: each padded in several groups
    assert engine.chunk_size >= 30
    order = engine.sample_order(30)
    assert all(len(packed_module.pad_groups(sizes[order[s: s + 10]])) > 1 for s in (0, 10, 20))
    grouped = engine.score(index, [inst], check_index=False)
    scale = np.abs(whole.terms).max()
    assert scale > 0
    np.testing.assert_allclose(grouped.terms, whole.terms, rtol=1e-5, atol=1e-6 * scale)


def test_instances_pair_x_b_with_a_reference_of_another_class(small):
    model = small["run"].load_model(small["run"].checkpoints[-1])
    test = small["test"]
    found = find_instances(model, small["cfg"], small["clean"], test, count=4)
    assert len(found) == 4
    assert len({i.meta["x_b_source"] for i in found}) == 4  # different test images
    keys = test.keys()
    emb = embed_images(model, [test.image(j) for j in range(len(test))], head=True)
    for inst in found:
        xb, xr = keys.index(inst.meta["x_b_source"]), keys.index(inst.meta["x_r_source"])
        own, pred = test.labels[xb], inst.meta["x_b_knn_class"]
        assert own != small["cfg"].target_class
        assert inst.meta["x_r_label"] == test.labels[xr] != own
        np.testing.assert_array_equal(inst.x_r, test.image(xr))
        # x_r: the nearest image of the class x_b is mapped to, else of any other class
        to_pred = pred != own and (test.labels == pred).any()
        pool = np.flatnonzero(test.labels == pred if to_pred else test.labels != own)
        assert inst.meta["x_r_pool"] == ("predicted-class" if to_pred else "other-class")
        sims = emb[pool] @ embed_images(model, [inst.x_b], head=True)[0]
        assert xr == pool[int(sims.argmax())]
    # the first instance is find_instance's
    one = find_instance(model, small["cfg"], small["clean"], test)
    # (cos to float32 rounding: x_b's embedding is taken in a batch of one vs four)
    assert one.meta.pop("cos") == pytest.approx(found[0].meta.pop("cos"), rel=1e-5)
    assert one.meta == found[0].meta


def test_pe1_instance_needs_the_trigger_class(small):
    model = small["run"].load_model(small["run"].checkpoints[-1])
    cfg = AttackConfig(attack="pe1", target_class=9)
    trig = small["aux"].image(0)
    with pytest.raises(DataError, match="pe1_trigger_label"):
        find_instances(model, cfg, small["clean"], small["test"], trig, count=3)
    label = int(small["aux"].labels[0])
    (inst,) = find_instances(model, cfg, small["clean"], small["test"], trig, count=3,
                             trigger_label=label)
    assert inst.meta["x_b_label"] == label != inst.meta["x_r_label"]
    np.testing.assert_array_equal(inst.x_b, trig)


def test_optimized_reference_raises_the_cosine_and_is_seeded(small):
    model = small["run"].load_model(small["run"].checkpoints[-1])
    (inst,) = find_instances(model, small["cfg"], small["clean"], small["test"])
    target = embed_images(model, [inst.x_b], head=True)
    start = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    start_img = (start[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    cos0 = float((embed_images(model, [start_img], head=True) * target).sum())
    img, cos = optimized_reference(model, inst.x_b, steps=30, lr=1e-2, seed=4)
    assert img.dtype == np.uint8 and img.shape == inst.x_b.shape
    assert 1 - cos < 0.5 * (1 - cos0)  # at least halves the gap to a perfect match
    again, cos2 = optimized_reference(model, inst.x_b, steps=30, lr=1e-2, seed=4)
    np.testing.assert_array_equal(img, again)
    (opt,) = with_optimized_references(model, [inst], steps=5)
    assert opt.meta["x_r_pool"] == "optimized" and opt.meta["x_b_source"] == inst.meta[
        "x_b_source"]
    np.testing.assert_array_equal(opt.x_b, inst.x_b)


def test_pick_order_puts_hits_first_in_seeded_order():
    took = np.array([False, True, False, True, True])
    picks = pick_order(took, np.random.default_rng(0), 4)
    assert sorted(picks[:3]) == [1, 3, 4] and not took[picks[3]]
    assert picks == pick_order(took, np.random.default_rng(0), 4)
    with pytest.raises(ValueError):
        pick_order(took, np.random.default_rng(0), 0)


def test_engine_scored_layer_override(small):
    """layers=("head.fc2",) scores that layer alone, fast path == reference; unknown layers
    are refused with the list of scorable ones; the override is recorded in the options."""
    model = small["run"].load_model(small["run"].checkpoints[-1])
    inst = find_instance(model, small["cfg"], small["clean"], small["test"])
    kw = dict(progress=False, batch_size=24, checkpoints="last", layers=("head.fc2",))
    fast = Engine(small["run"], **kw).score(small["index"], [inst])
    ref = Engine(small["run"], reference=True, **kw).score(small["index"], [inst])
    scale = np.abs(ref.terms).max()
    assert scale > 0
    assert np.abs(fast.terms - ref.terms).max() <= 1e-5 * scale
    full = Engine(small["run"], progress=False, batch_size=24, checkpoints="last")
    assert not np.allclose(full.score(small["index"], [inst]).terms, fast.terms)
    assert Engine(small["run"], **kw).options()["layers"] == ["head.fc2"]
    assert "layers" not in full.options()
    with pytest.raises(ConfigError, match="scorable layers"):
        Engine(small["run"], progress=False, layers=("head.nope",)).score(small["index"], [inst])


def test_engine_bf16_backbone_moves_scores_a_little(small):
    """precision="bfloat16": the backbone under bf16 autocast, the head's maths in float32;
    scores stay close to float32's (same views and batches) but are not equal to them."""
    model = small["run"].load_model(small["run"].checkpoints[-1])
    inst = find_instance(model, small["cfg"], small["clean"], small["test"])
    kw = dict(progress=False, batch_size=24, checkpoints="last")
    f32 = Engine(small["run"], **kw).score(small["index"], [inst]).scores[:, 0]
    eng = Engine(small["run"], precision="bfloat16", **kw)
    assert eng.options()["precision"] == "bfloat16"
    b16 = eng.score(small["index"], [inst]).scores[:, 0]
    assert b16.dtype == np.float32 and not np.array_equal(b16, f32)
    assert np.corrcoef(b16, f32)[0, 1] > 0.95
    with pytest.raises(ConfigError, match="precision"):
        Engine(small["run"], precision="float16")


def test_engine_checkpoint_selection(small):
    assert [c.epoch for c in Engine(small["run"], checkpoints="last").checkpoints] == [2]
    with pytest.raises(ConfigError, match="epoch"):
        Engine(small["run"], checkpoints=[7])


def test_cli_end_to_end(small, tmp_path, capsys):
    root = small["root"]
    data, run, inst, out = tmp_path / "data", tmp_path / "run", tmp_path / "inst", tmp_path / "t"

    printed = {}

    def call(*args):
        assert main([str(a) for a in args]) == 0
        printed["out"] = capsys.readouterr().out
        return json.loads(printed["out"].strip().splitlines()[-1])

    p = call("poison", "--clean", root / "clean", "--aux", root / "aux", "-o", data,
             "--poison-rate", "0.1", "--json", "--quiet")
    assert p["n_poisoned"] == 10 and p["n"] == 106
    call("pretrain", "--index", data / "index", "-o", run, "--model", "tiny", "--epochs", 1,
         "--batch-size", 32, "--json", "--quiet")
    i = call("instance", "--run", run, "--data", data, "--bank", root / "clean", "--test",
             root / "test", "-o", inst, "--json", "--quiet")
    assert {"asr", "asr_untriggered"} <= set(i["strength"])
    assert i["x_r_label"] != i["x_b_label"]
    two = call("instance", "--run", run, "--data", data, "--bank", root / "clean", "--test",
               root / "test", "-o", tmp_path / "two", "--count", 2, "--json", "--quiet")
    assert two["instances"] == [str(tmp_path / "two" / "00"), str(tmp_path / "two" / "01")]
    # the same first instance; its cosine to float32 rounding (batches of another size, and
    # another thread count, round differently)
    first = {**two["metas"][0], "cos": pytest.approx(i["cos"], rel=1e-5)}
    assert first == {**i, "strength": two["strength"]}
    opt = call("instance", "--run", run, "--data", data, "--bank", root / "clean", "--test",
               root / "test", "-o", tmp_path / "opt", "--reference", "optimized", "--json",
               "--quiet")
    assert opt["x_r_pool"] == "optimized" and opt["x_b_source"] == i["x_b_source"]
    t = call("trace", "--run", run, "--index", data / "index", "--instance", inst,
             *two["instances"], "-o", out, "--json", "--quiet")
    assert t["n"] == 106 and np.load(out / "scores.npy").shape == (106, 3)
    for f in ("scores.npy", "terms.npy", "flagged.npy", "domains.txt", "scores.png",
              "summary.json", "metadata.json"):
        assert (out / f).stat().st_size > 0
    # the share of the flagged set in x_r's classes (the usual false positives)
    labels = SampleIndex(data / "index").labels
    ref = sorted({i["x_r_label"], *(m["x_r_label"] for m in two["metas"])})
    share = t["reference_class"]
    assert share["labels"] == ref and share["total"] == int(np.isin(labels, ref).sum())
    flagged = np.load(out / "flagged.npy")
    assert share["flagged"] == int(np.isin(labels[flagged], ref).sum())
    assert main(["trace", "--run", str(run), "--index", str(data / "index"), "--instance",
                 str(inst), *two["instances"], "-o", str(out), "--quiet"]) == 0  # finished
    text = capsys.readouterr().out
    assert text.startswith(f"flagged {t['n_flagged']} of 106 inputs")
    assert ("the class of x_r" in text) == (t["n_flagged"] > 0)
    # three instances against the default's measured count: said, with how they combine
    n_default = METHODS[DEFAULT_METHOD].instances
    assert (f"method {DEFAULT_METHOD} was measured (docs/RESULTS.md) with {n_default} "
            f"instance(s); 3 given, their scores combined by mean." in text) == (n_default != 3)
    # a named method sets checkpoints / draws / aggregate / k; explicit options override
    t2 = call("trace", "--run", run, "--index", data / "index", "--instance", inst, "-o",
              tmp_path / "t2", "--method", "last-max16x5", "--draws", 2, "--json", "--quiet")
    meta = json.loads((tmp_path / "t2" / "metadata.json").read_text())
    assert meta["options"]["draws"] == 2 and meta["options"]["aggregate"] == "max"
    terms = np.load(tmp_path / "t2" / "terms.npy")
    assert terms.shape == (1, 2, 106, 1)
    np.testing.assert_allclose(np.load(tmp_path / "t2" / "scores.npy")[:, 0],
                               terms[0, :, :, 0].max(0), rtol=1e-6)
    assert t2["n"] == 106
    assert ("method last-max16x5 was measured (docs/RESULTS.md) with 5 instance(s); 1 given"
            in printed["out"])
    # --combine min: the detection score is the instances' minimum, recorded as an option
    t4 = call("trace", "--run", run, "--index", data / "index", "--instance", inst,
              *two["instances"], "-o", tmp_path / "t4", "--checkpoints", "last",
              "--combine", "min", "--json", "--quiet")
    assert t4["combine"] == "min"
    np.testing.assert_array_equal(np.load(tmp_path / "t4" / "detection_scores.npy"),
                                  np.load(tmp_path / "t4" / "scores.npy").min(1))
    meta4 = json.loads((tmp_path / "t4" / "metadata.json").read_text())
    assert meta4["options"]["combine"] == "min"
    assert main(["trace", "--run", str(run), "--index", str(data / "index"), "--instance",
                 str(inst), *two["instances"], "-o", str(tmp_path / "t4"), "--checkpoints",
                 "last", "--quiet"]) == 1  # the mean on the same directory: refused
    assert "combine" in capsys.readouterr().err
    # --threshold mad-split: the MAD flags refined by Otsu's split, said in the summary
    t5 = call("trace", "--run", run, "--index", data / "index", "--instance", inst, "-o",
              tmp_path / "t5", "--checkpoints", "last", "--k", "0.5", "--threshold",
              "mad-split", "--json", "--quiet")
    assert t5["threshold_rule"] == "mad-split" and t5["split"]["n_flagged_mad"] >= t5["n_flagged"]
    assert t5["n_flagged"] == len(np.load(tmp_path / "t5" / "flagged.npy"))
    # --weighting rise needs two checkpoints; this run has one: a one-line error, exit 1
    assert main(["trace", "--run", str(run), "--index", str(data / "index"), "--instance",
                 str(inst), "-o", str(tmp_path / "t3"), "--weighting", "rise", "--quiet"]) == 1
    assert "at least 2 checkpoints" in capsys.readouterr().err
    e = call("eval", "--truth", data / "truth.json", out, "--json")
    assert {"dacc", "fpr", "fnr", "auc", "n", "n_poisoned", "n_flagged"} <= set(e)
    assert e["n_poisoned"] == 10 and e["n_flagged"] == t["n_flagged"]
    assert e["dacc"] <= e["dacc_best_threshold"] <= 1.0


def test_cli_errors_exit_1_with_one_line(tmp_path, capsys):
    assert main(["trace", "--run", str(tmp_path), "--index", str(tmp_path), "--instance",
                 str(tmp_path), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run directory" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["trace"])
    assert e.value.code == 2


def test_rise_weighting_scores_each_checkpoint_by_the_cosines_rise(small, tmp_path):
    """weighting="rise": Engine.score and trace give Σ_t max(0, cos_t - cos_{t-1}) · term_t,
    per instance, from the same terms as Eq. 5 (which the weighting does not touch)."""
    from ffengine.trace import trace

    model = small["run"].load_model(small["run"].checkpoints[-1])
    a, b = find_instances(model, small["cfg"], small["clean"], small["test"], count=2)
    kw = dict(progress=False, batch_size=24, draws=2, aggregate="max")
    # this 2-epoch run's cosines barely move (and fall): set them, so that one instance's
    # rises by 0.4 and the other's falls, through the engine's own prepare()
    cos = np.array([[0.3, 0.9], [0.7, 0.5]], dtype=np.float32)

    def engine(**extra):
        return with_cos(Engine(small["run"], **kw, **extra), cos)

    lr = engine().score(small["index"], [a, b])
    with pytest.warns(UserWarning, match=r"never rose .* \[1\]"):  # instance 1's fell
        rise = engine(weighting="rise").score(small["index"], [a, b])
    np.testing.assert_array_equal(rise.terms, lr.terms)
    assert lr.terms.shape[0] == 2 and np.abs(lr.terms[1, :, :, 0]).max() > 0
    want = np.zeros(lr.scores.shape)
    want[:, 0] = (np.float64(cos[1, 0]) - cos[0, 0]) * lr.terms[1, :, :, 0].max(axis=0)
    scale = np.abs(lr.terms).max()
    np.testing.assert_allclose(rise.scores, want, rtol=1e-5, atol=1e-6 * scale)
    with pytest.warns(UserWarning, match="never rose"):
        summary = trace(engine(weighting="rise"), small["index"], [a, b], tmp_path / "t",
                        k=3.0)
    assert summary["weighting"] == "rise"
    np.testing.assert_allclose(summary["checkpoint_weights"], [[0.0, 0.0], [0.4, 0.0]],
                               rtol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "t" / "scores.npy"), rise.scores,
                               rtol=1e-5, atol=1e-6 * scale)
    # the weighting is an option of the result: another one is refused, not mixed in
    with pytest.raises(ManifestMismatchError):
        trace(Engine(small["run"], **kw), small["index"], [a, b], tmp_path / "t", k=3.0)


def test_engine_workers_default_and_refuse_negative(small):
    assert Engine(small["run"], progress=False).workers == 0  # CPU: decode in process
    assert Engine(small["run"], progress=False, workers=2).workers == 2
    with pytest.raises(ConfigError, match="workers"):
        Engine(small["run"], progress=False, workers=-1)


def test_rise_weighting_needs_two_checkpoints(small):
    with pytest.raises(ConfigError, match="at least 2 checkpoints"):
        Engine(small["run"], checkpoints="last", weighting="rise")
    with pytest.raises(ConfigError, match="weighting"):
        Engine(small["run"], weighting="steps")


def test_new_runs_train_channels_last_and_a_resume_keeps_the_format_a_run_began_with(
        small, tmp_path, monkeypatch):
    """New runs record channels-last (measured faster on CPU too) and train in it; a run
    whose manifest predates the record began NCHW on CPU in float32, so it resumes NCHW and
    records that, and an unknown recorded format is refused."""
    from ffengine.pretrain import simclr
    from ffengine.run import MANIFEST

    seen = []

    def build_model(cfg):
        model = simclr.build_model.__wrapped__(cfg)
        model.register_forward_pre_hook(lambda m, args: seen.append(
            args[0].is_contiguous(memory_format=torch.channels_last)
            and not args[0].is_contiguous()))
        return model

    build_model.__wrapped__ = simclr.build_model
    monkeypatch.setattr(simclr, "build_model", build_model)
    assert small["run"].manifest["memory_format"] == "channels_last"
    pretrain(small["index"], tmp_path / "r", TINY, progress=False, max_epochs_this_call=1)
    assert seen and all(seen)
    path = tmp_path / "r" / MANIFEST
    legacy = json.loads(path.read_text())
    del legacy["memory_format"]
    path.write_text(json.dumps(legacy))
    seen.clear()
    resumed = pretrain(small["index"], tmp_path / "r", TINY, progress=False)
    assert seen and not any(seen)
    assert resumed.manifest["memory_format"] == "contiguous"
    assert [c.epoch for c in resumed.checkpoints] == [1, 2]
    # the old rule for runs without a record: channels-last only under bf16 or on CUDA
    assert simclr.run_memory_format({}, True, torch.device("cpu")) == "channels_last"
    assert simclr.run_memory_format({}, False, torch.device("cuda")) == "channels_last"
    with pytest.raises(ConfigError, match="memory_format 'nhwc'"):
        simclr.run_memory_format({"memory_format": "nhwc"}, False, torch.device("cpu"))
