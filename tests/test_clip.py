"""The multi-modal path: image-caption data, CLIP attacks, open_clip models created offline,
CLIP pre-training, and CLIP scoring against its slow reference (DESIGN.md §2, CLIP)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from ffengine.attacks.clip_attacks import (
    ClipAttackConfig,
    apply_ce_trigger,
    apply_ct_patch,
    central_band,
    corruptencoder_composite,
    ct_noise_patch,
    poison_clip_dataset,
)
from ffengine.attacks.poisoned_encoder import ATTACKER_DOMAINS, BENIGN_DOMAINS, load_truth
from ffengine.attacks.triggers import TriggerConfig, make_trigger
from ffengine.cli import main
from ffengine.data.captions import (
    IMAGENET_TEMPLATES,
    build_caption_set,
    caption_for,
    template_index,
    write_caption_shards,
)
from ffengine.data.demo_data import CIFAR10_CLASSES, demo_index
from ffengine.data.index import SampleIndex, build_index, index_arrays
from ffengine.engine.clip_backdoor import clip_backdoor_strength, find_clip_instance
from ffengine.engine.clip_objective import (
    ClipObjective,
    clip_cosine_gradients,
    clip_ghost_terms,
    clip_signals,
)
from ffengine.engine.head import normalized_scores
from ffengine.engine.instance import Instance
from ffengine.engine.objective import objective_for
from ffengine.engine.scoring import Engine
from ffengine.errors import ConfigError, DataError, ManifestMismatchError
from ffengine.losses import clip_infonce, clip_per_sample_sum, clip_sample_loss
from ffengine.models.clip import (
    create_clip,
    default_scored_layers,
    import_clip_checkpoint,
    load_clip_model,
    scored_linears,
    visual_split,
)
from ffengine.pretrain.clip import ClipPretrainConfig, pretrain_clip
from ffengine.reference.clip_scoring import score_clip_batch_reference
from ffengine.run import Run

from .conftest import TOLERANCES

TINY = ClipPretrainConfig(model="ffclip-vit-test", epochs=2, batch_size=16, ckpt_every=1,
                          lr=2e-3, seed=3)
INNER = "visual.transformer.resblocks.0.mlp.c_fc"  # a Linear inside the ViT: tokens as views


def _subset(split: str, n: int, out, start: int = 0) -> SampleIndex:
    src = demo_index(split)
    ids = range(start, start + n)
    return index_arrays([src.image(i) for i in ids], out, labels=src.labels[start:start + n],
                        keys=[src.key(i) for i in ids])


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _png(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def random_clip(name: str, dtype: torch.dtype, gen: torch.Generator):
    """A tiny open_clip model in eval mode, its visual-tower weights re-drawn so that
    embeddings of different images differ (a fresh ModifiedResNet maps every image close to
    one point)."""
    m = create_clip(name, seed=0).to(dtype)
    with torch.no_grad():
        for n, p in m.clip.visual.named_parameters():
            if p.ndim >= 2 or "proj" in n:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * (p.shape[-1]) ** -0.5)
        for mod in m.clip.visual.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.fill_(1.0)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen,
                                                 dtype=dtype) + 0.5)
    return m.eval()


# --------------------------------------------------------------------------- captions
def test_templates_are_clips_80_and_match_open_clip():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert list(IMAGENET_TEMPLATES) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def test_caption_shards_layout_and_captions(tmp_path):
    src = _subset("train", 24, tmp_path / "src")
    (path,) = write_caption_shards(src, tmp_path / "shards", "train", seed=5)
    members = _read_tar(path)
    assert list(members) == src.keys()  # order kept
    for i, key in enumerate(src.keys()):
        m = members[key]
        assert set(m) == {"jpg", "txt", "json", "cls"}
        assert m["jpg"] == src.image_bytes(i)  # original bytes, no re-encoding
        name = CIFAR10_CLASSES[int(src.labels[i])]
        cap = m["txt"].decode()
        assert cap == IMAGENET_TEMPLATES[template_index(key, 5)].format(name)
        meta = json.loads(m["json"])
        assert urlparse(meta["url"]).hostname in BENIGN_DOMAINS
        assert meta["caption"] == cap and meta["key"] == key
        assert (meta["width"], meta["height"]) == (32, 32) and int(m["cls"]) == src.labels[i]
    index = build_index([path], tmp_path / "index")
    assert [index.caption(i) for i in range(3)] == [members[k]["txt"].decode()
                                                    for k in src.keys()[:3]]
    # the template is a function of (key, seed), not of the position; seeds differ
    assert caption_for("train_00007", "cat", 5) == caption_for("train_00007", "cat", 5)
    assert len({template_index(f"k{i}", 0) for i in range(400)}) > 60
    assert [template_index(f"k{i}", 0) for i in range(50)] != [
        template_index(f"k{i}", 1) for i in range(50)]


def test_build_caption_set_from_the_bundled_split(tmp_path):
    out = build_caption_set(tmp_path / "cc", splits=("test",))
    ix = out["test"]
    src = demo_index("test")
    assert len(ix) == len(src) and ix.keys() == src.keys()
    np.testing.assert_array_equal(ix.labels, src.labels)
    assert set(ix.domain_names) <= set(BENIGN_DOMAINS)
    for i in (0, 500, 999):
        name = CIFAR10_CLASSES[int(src.labels[i])]
        assert ix.caption(i) == caption_for(src.key(i), name)
        assert ix.image_bytes(i) == src.image_bytes(i)


# --------------------------------------------------------------------------- attacks
def test_ct_patch_geometry_and_noise():
    cfg = ClipAttackConfig(attack="ct", patch_size=16, noise_std=200.0, seed=4)
    patch = ct_noise_patch(cfg)
    assert patch.shape == (16, 16, 3) and patch.dtype == np.uint8
    assert (patch == 0).any() and (patch == 255).any()  # σ=200: clipped at both ends
    img = np.full((32, 40, 3), 77, dtype=np.uint8)
    spots = set()
    for seed in range(12):
        out, (y, x) = apply_ct_patch(img, cfg, seed)
        assert 0 <= y <= 32 - 16 and 0 <= x <= 40 - 16
        np.testing.assert_array_equal(out[y:y + 16, x:x + 16], patch)  # one fixed pattern
        rest = out.copy()
        rest[y:y + 16, x:x + 16] = 77
        assert (rest == 77).all()  # nothing else changed
        assert apply_ct_patch(img, cfg, seed)[1] == (y, x)  # seeded per image
        spots.add((y, x))
    assert len(spots) > 6  # a random location per image
    per = ClipAttackConfig(attack="ct", ct_noise="per-image")
    a, (ya, xa) = apply_ct_patch(img, per, 1)
    b, (yb, xb) = apply_ct_patch(img, per, 2)
    assert not np.array_equal(a[ya:ya + 16, xa:xa + 16], b[yb:yb + 16, xb:xb + 16])
    with pytest.raises(ConfigError, match="does not fit"):
        apply_ct_patch(np.zeros((8, 8, 3), np.uint8), cfg, 0)


def test_corruptencoder_clip_trigger():
    cfg = ClipAttackConfig(attack="corruptencoder", trigger=TriggerConfig(size=6,
                                                                          location="random"))
    patch, _ = make_trigger(cfg.trigger)
    img = np.zeros((32, 32, 3), np.uint8)
    out, (y, x) = apply_ce_trigger(img, cfg, 3)
    np.testing.assert_array_equal(out[y:y + 6, x:x + 6], patch)
    assert out.sum() == patch.astype(np.int64).sum()


@pytest.mark.parametrize("s", [4, 8, 20])
def test_corruptencoder_simclr_composite_geometry(s, np_rng):
    cfg = ClipAttackConfig(attack="corruptencoder", modality="simclr",
                           trigger=TriggerConfig(size=s, colour=(255, 0, 255)))
    obj = np_rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)
    bg = np.full((32, 32, 3), 30, np.uint8)
    sides = set()
    for k in range(16):
        img, geo = corruptencoder_composite(obj, bg, cfg, np.random.default_rng(k))
        assert img.shape == (32, 64, 3)
        ox = 0 if geo["object_side"] == "left" else 32
        np.testing.assert_array_equal(img[:, ox:ox + 32], obj)  # the object, untouched
        y, x = geo["trigger_yx"]
        tside = "right" if geo["object_side"] == "left" else "left"
        (y0, y1), (x0, x1) = central_band(32, 32, s, tside)
        assert y0 <= y <= y1 and x0 <= x <= x1
        tx = 32 - ox  # the other half
        assert tx <= x and x + s <= tx + 32  # inside the other half
        if s <= 16:  # the trigger's centre lies in the middle half of rows and columns
            assert 8 <= y + s / 2 <= 24 and tx + 8 <= x + s / 2 <= tx + 24
        assert (img[y:y + s, x:x + s] == np.array([255, 0, 255])).all()
        other = img[:, tx:tx + 32].copy()
        other[y:y + s, x - tx:x - tx + s] = 30
        assert (other == 30).all()  # the rest of that half is background
        sides.add(geo["object_side"])
    assert sides == {"left", "right"}


def test_attack_config_validation():
    with pytest.raises(ConfigError, match="modality must be 'clip'"):
        ClipAttackConfig(attack="ct", modality="simclr")
    with pytest.raises(ConfigError, match="not one of"):
        ClipAttackConfig(attack="pe2")
    cfg = ClipAttackConfig(attack="corruptencoder", modality="simclr", poison_rate=0.2)
    assert ClipAttackConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Real CIFAR-10 images: 60 clean, 60 auxiliary, 30 test."""
    root = tmp_path_factory.mktemp("clip_small")
    return {"root": root, "clean": _subset("train", 60, root / "clean"),
            "aux": _subset("aux", 60, root / "aux"), "test": _subset("test", 30, root / "test")}


@pytest.mark.parametrize(("attack", "modality"), [("ct", "clip"), ("corruptencoder", "clip"),
                                                  ("corruptencoder", "simclr")])
def test_poison_clip_dataset(small, tmp_path, attack, modality):
    cfg = ClipAttackConfig(attack=attack, modality=modality, poison_rate=0.1, target_class=9)
    truth = poison_clip_dataset(small["clean"], small["aux"], tmp_path / "d", cfg)
    assert truth == load_truth(tmp_path / "d")
    index = SampleIndex(tmp_path / "d" / "index")
    assert truth["n"] == len(index) == 66 and truth["index_hash"] == index.hash
    assert len(truth["poisoned_ids"]) == 6
    assert [index.key(i) for i in truth["poisoned_ids"]] == truth["poisoned_keys"]
    assert ClipAttackConfig.from_dict(truth["attack"]) == cfg
    names = index.domain_names
    for i in range(len(index)):
        poisoned = i in truth["poisoned_ids"]
        dom = names[index.domains[i]]
        assert dom in (ATTACKER_DOMAINS if poisoned else BENIGN_DOMAINS)
        cap = index.caption(i)
        if not poisoned:
            assert cap == caption_for(index.key(i), CIFAR10_CLASSES[int(index.labels[i])])
        elif modality == "clip":  # a prompt template of the target label
            assert cap in [t.format("truck") for t in IMAGENET_TEMPLATES]
        else:
            assert cap is None
    poison = _read_tar(tmp_path / "d" / "shards" / "poison-000000.tar")
    aux = small["aux"]
    for key, m in poison.items():
        img, src = _png(m["png"]), truth["sources"][key]
        if attack == "ct":
            y, x = src["patch_yx"]
            assert aux.labels[src["carrier_id"]] != 9
            np.testing.assert_array_equal(img[y:y + 16, x:x + 16], ct_noise_patch(cfg))
            outside = np.ones((32, 32), bool)
            outside[y:y + 16, x:x + 16] = False
            np.testing.assert_array_equal(img[outside], aux.image(src["carrier_id"])[outside])
        elif modality == "clip":
            assert aux.labels[src["target_id"]] == 9 and img.shape == (32, 32, 3)
            y, x = src["trigger_yx"]
            np.testing.assert_array_equal(img[y:y + 8, x:x + 8], make_trigger(cfg.trigger)[0])
        else:
            assert img.shape == (32, 64, 3) and aux.labels[src["target_id"]] == 9
            ox = 0 if src["object_side"] == "left" else 32
            np.testing.assert_array_equal(img[:, ox:ox + 32], aux.image(src["target_id"]))
    assert (tmp_path / "d" / "trigger.png").exists()


def test_cli_poison_ct(small, tmp_path, capsys):
    args = ["poison", "--attack", "ct", "--clean", str(small["root"] / "clean"), "--aux",
            str(small["root"] / "aux"), "-o", str(tmp_path / "p"), "--poison-rate", "0.05",
            "--json", "--quiet"]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["n_poisoned"] == 3 and info["n"] == 63
    assert load_truth(tmp_path / "p")["attack"]["attack"] == "ct"
    # reproducible bytes: the same attack written again has the same index hash
    again = poison_clip_dataset(small["clean"], small["aux"], tmp_path / "q",
                                ClipAttackConfig(attack="ct", poison_rate=0.05))
    assert again["index_hash"] == info["index_hash"]


# --------------------------------------------------------------------------- models
def test_models_are_created_offline_with_their_default_layers():
    vit, rn = create_clip("ffclip-vit-test"), create_clip("ffclip-rn-test")
    assert default_scored_layers(vit) == ("visual.proj",)
    assert default_scored_layers(rn) == ("visual.attnpool.c_proj",)
    (p,) = scored_linears(vit)
    assert p.kind == "vit_proj" and p.linear_weight().shape == (12, 24) and p.bias is None
    (c,) = scored_linears(rn)
    assert c.kind == "attnpool_c_proj" and c.bias is not None
    # the same seed, the same weights; the global RNG untouched
    state = torch.random.get_rng_state()
    a, b = create_clip("ffclip-vit-test", seed=7), create_clip("ffclip-vit-test", seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


@pytest.mark.parametrize(("name", "layer"), [("RN50", "visual.attnpool.c_proj"),
                                             ("ViT-B-32", "visual.proj")])
def test_open_clip_families_offline(name, layer):
    """open_clip's RN50 and ViT-B-32 architectures, random weights, no download."""
    m = create_clip(name)
    assert default_scored_layers(m) == (layer,)
    assert m.image_size == 224 and m.context_length == 77


def test_tokenizer_is_bundled_with_open_clip():
    import open_clip

    vocab = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    assert vocab.is_file()
    m = create_clip("ffclip-vit-test")
    tok = m.tokenize(["a photo of a truck.", "itap of my dog."])
    assert tok.shape == (2, 24) and tok.dtype == torch.int64
    assert (tok[:, 0] == 49406).all()  # start of text
    assert (tok == 49407).sum() == 2  # one end of text each


@pytest.mark.parametrize("name", ["ffclip-vit-test", "ffclip-rn-test"])
def test_visual_split_equals_open_clip_forward(name, rng):
    m = random_clip(name, torch.float64, rng)
    x = torch.rand(4, 3, 32, 32, generator=rng, dtype=torch.float64)
    h, e = visual_split(m, x)
    torch.testing.assert_close(e, m.encode_image(x), rtol=1e-12, atol=1e-14)
    (s,) = scored_linears(m)
    bias = 0 if s.bias is None else s.bias
    torch.testing.assert_close(e, h @ s.linear_weight().T + bias, rtol=1e-12, atol=1e-14)


def test_unknown_or_unsupported_layers_are_refused():
    vit, rn = create_clip("ffclip-vit-test"), create_clip("ffclip-rn-test")
    with pytest.raises(ConfigError, match="visual tower"):
        scored_linears(vit, ["text_projection"])
    with pytest.raises(ConfigError, match="not an nn.Linear"):
        scored_linears(vit, ["visual.nope"])
    with pytest.raises(ConfigError, match="needs a ViT"):
        scored_linears(rn, ["visual.proj"])
    with pytest.raises(ConfigError, match="only c_proj"):
        scored_linears(rn, ["visual.attnpool.q_proj"])
    with pytest.raises(ConfigError, match="no model config"):
        create_clip("no-such-model")


# --------------------------------------------------------------------------- loss and score
def test_per_sample_surrogate_matches_the_per_sample_losses(rng):
    img = torch.randn(7, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(7, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    scale = 9.0
    total = clip_per_sample_sum(img, txt, scale)
    ref = sum(clip_sample_loss(img, txt, i, scale) for i in range(7))
    assert torch.allclose(total, ref, rtol=1e-12)
    assert torch.allclose(total, clip_infonce(img, txt, scale) * 7, rtol=1e-12)
    g, gt = torch.autograd.grad(total, [img, txt], allow_unused=True)
    assert gt is None or gt.abs().max() == 0  # texts are constants
    for i in range(7):
        (gi,) = torch.autograd.grad(clip_sample_loss(img, txt, i, scale), img)
        torch.testing.assert_close(g[i], gi[i], rtol=1e-10, atol=1e-14)
        others = [r for r in range(7) if r != i]
        assert gi[others].abs().max() == 0  # the other images are constants


def _instances(k: int, dtype, gen):
    xb = [torch.rand(3, 32, 32, generator=gen, dtype=dtype) for _ in range(k)]
    xr = [torch.rand(3, 32, 32, generator=gen, dtype=dtype) for _ in range(k)]
    return xb, xr


def _fast(m, x, txt, grads, layers, scale, backend="torch"):
    sig = clip_signals(m, x, txt, scored_linears(m, layers), scale)
    return normalized_scores(*clip_ghost_terms(sig, grads, backend))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("name", "layers"), [
    ("ffclip-vit-test", ("visual.proj",)), ("ffclip-rn-test", ("visual.attnpool.c_proj",)),
    ("ffclip-vit-test", ("visual.proj", INNER))])
@pytest.mark.parametrize(("k", "b"), [(1, 2), (3, 5)])
def test_fast_path_equals_autograd_reference(dtype, name, layers, k, b, rng):
    m = random_clip(name, dtype, rng)
    grads, _ = clip_cosine_gradients(m, *_instances(k, dtype, rng), layers)
    x = torch.rand(b, 3, 32, 32, generator=rng, dtype=dtype)
    txt = torch.randn(b, 12, generator=rng, dtype=dtype)
    scale = torch.tensor(11.0, dtype=dtype)
    ref = score_clip_batch_reference(m, x, txt, grads, layers, scale)
    got = _fast(m, x, txt, grads, layers, scale, backend="auto")
    assert got.shape == (b, k)
    s = ref.abs().max()
    assert s > 0
    assert ((got - ref).abs().max() / s).item() <= TOLERANCES[dtype]


def test_cosine_gradient_matches_finite_differences(rng):
    m = random_clip("ffclip-vit-test", torch.float64, rng)
    xb, xr = _instances(1, torch.float64, rng)
    grads, cos = clip_cosine_gradients(m, xb, xr, ["visual.proj"])

    def neg_cos():
        with torch.no_grad():
            return -F.cosine_similarity(m(xb[0][None]), m(xr[0][None])).item()

    assert abs(-neg_cos() - cos[0].item()) < 1e-12
    proj, eps = m.clip.visual.proj, 1e-6
    for idx in [(0, 0), (5, 3), (23, 11)]:
        with torch.no_grad():
            proj[idx] += eps
            up = neg_cos()
            proj[idx] -= 2 * eps
            down = neg_cos()
            proj[idx] += eps
        # Linear layout: weight = proj.T
        assert abs((up - down) / (2 * eps) - grads["visual.proj.weight"][0][idx[::-1]]) < 1e-7


@pytest.mark.parametrize("name", ["ffclip-vit-test", "ffclip-rn-test"])
def test_score_sign_predicts_the_cosine_rise_of_a_descent_step(name, rng):
    """A small normalized descent step on one pair's loss raises cos(f(x_b), f(x_r)) by
    step·s_i to first order (DESIGN.md §2)."""
    m = random_clip(name, torch.float64, rng)
    xb, xr = _instances(1, torch.float64, rng)
    x = torch.rand(6, 3, 32, 32, generator=rng, dtype=torch.float64)
    txt = torch.randn(6, 12, generator=rng, dtype=torch.float64)
    scale = torch.tensor(10.0, dtype=torch.float64)
    layers = default_scored_layers(m)
    grads, cos0 = clip_cosine_gradients(m, xb, xr, layers)
    scores = _fast(m, x, txt, grads, layers, scale)[:, 0]
    params = [p for s in scored_linears(m, layers) for p in s.params()]
    step = 1e-6
    for i in range(6):
        with torch.enable_grad():
            g = torch.autograd.grad(clip_sample_loss(m.encode_image(x), txt, i, scale), params)
        norm = torch.sqrt(sum((t * t).sum() for t in g))
        with torch.no_grad():
            for p, t in zip(params, g, strict=True):
                p -= step * t / norm
            cos1 = F.cosine_similarity(m(xb[0][None]), m(xr[0][None])).item()
            for p, t in zip(params, g, strict=True):
                p += step * t / norm
        measured, predicted = cos1 - cos0.item(), step * scores[i].item()
        assert np.sign(measured) == np.sign(predicted)
        assert abs(measured - predicted) <= 1e-3 * abs(predicted) + 1e-13


def test_zero_gradient_pair_scores_zero_not_nan(rng):
    """A batch of one pair: each cross-entropy has one candidate, so ℓ_pre ≡ 0."""
    m = random_clip("ffclip-vit-test", torch.float64, rng)
    grads, _ = clip_cosine_gradients(m, *_instances(2, torch.float64, rng), ["visual.proj"])
    x = torch.rand(1, 3, 32, 32, generator=rng, dtype=torch.float64)
    txt = torch.randn(1, 12, generator=rng, dtype=torch.float64)
    got = _fast(m, x, txt, grads, ["visual.proj"], 10.0)
    assert torch.equal(got, torch.zeros(1, 2, dtype=torch.float64))
    ref = score_clip_batch_reference(m, x, txt, grads, ["visual.proj"], 10.0)
    assert torch.equal(ref, torch.zeros(1, 2, dtype=torch.float64))


def test_signals_need_eval_mode(rng):
    m = random_clip("ffclip-vit-test", torch.float32, rng).train()
    with pytest.raises(ConfigError, match="eval mode"):
        clip_signals(m, torch.rand(2, 3, 32, 32), torch.randn(2, 12), scored_linears(m), 1.0)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(small):
    root = small["root"]
    cfg = ClipAttackConfig(attack="ct", poison_rate=0.1)
    truth = poison_clip_dataset(small["clean"], small["aux"], root / "data", cfg)
    index = SampleIndex(root / "data" / "index")
    run = pretrain_clip(index, root / "run", TINY, progress=False)
    return {**small, "cfg": cfg, "truth": truth, "index": index, "run": run}


def test_clip_run_manifest_and_checkpoints(trained):
    run = Run(trained["root"] / "run")
    m = run.manifest
    assert m["objective"]["name"] == "clip_infonce"
    assert m["objective"]["max_logit_scale"] == 100.0
    assert m["model"]["family"] == "open_clip" and m["model"]["name"] == "ffclip-vit-test"
    assert run.scored_layers == ("visual.proj",)
    assert run.index_hash == trained["index"].hash
    assert [c.epoch for c in run.checkpoints] == [1, 2]
    for c in run.checkpoints:
        state = load_file(str(c.weights))
        model = load_clip_model(run, c)
        for k, v in model.clip.state_dict().items():
            assert torch.equal(v, state[k]), k
        assert model.logit_scale().item() <= 100.0
        opt = torch.load(c.optimizer, weights_only=True)
        assert opt["param_groups"][0]["lr"] == pytest.approx(c.lr)


def test_clip_resume_equals_uninterrupted(trained, tmp_path):
    pretrain_clip(trained["index"], tmp_path / "r", TINY, progress=False,
                  max_epochs_this_call=1)
    assert [c.epoch for c in Run(tmp_path / "r").checkpoints] == [1]
    resumed = pretrain_clip(trained["index"], tmp_path / "r", TINY, progress=False)
    a = load_file(str(resumed.checkpoints[-1].weights))
    b = load_file(str(trained["run"].checkpoints[-1].weights))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    other = ClipPretrainConfig(model="ffclip-vit-test", epochs=2, batch_size=8, seed=3)
    with pytest.raises(ManifestMismatchError, match="training settings"):
        pretrain_clip(trained["index"], tmp_path / "r", other, progress=False)


def test_score_clip_fast_equals_reference_end_to_end(trained):
    run, index, test = trained["run"], trained["index"], trained["test"]
    model = load_clip_model(run, run.checkpoints[-1])
    inst = find_clip_instance(model, trained["cfg"], test, CIFAR10_CLASSES)
    assert inst.x_b.shape == (32, 32, 3) and inst.meta["x_b_source"] != inst.meta["x_r_source"]
    strength = clip_backdoor_strength(model, trained["cfg"], test, CIFAR10_CLASSES)
    assert 0 <= strength["asr"] <= 1 and strength["n_test"] == int((test.labels != 9).sum())
    kw = dict(batch_size=20, progress=False)
    fast = Engine(run, **kw).score(index, [inst, inst])
    ref = Engine(run, reference=True, **kw).score(index, [inst, inst])
    assert fast.terms.shape == (2, 1, len(index), 2) and fast.cos.shape == (2, 2)
    scale = np.abs(ref.terms).max()
    assert scale > 0
    assert np.abs(fast.terms - ref.terms).max() <= 1e-5 * scale
    np.testing.assert_array_equal(fast.scores[:, 0], fast.scores[:, 1])
    np.testing.assert_allclose(fast.scores[:, 0], fast.terms[..., 0].sum((0, 1)), rtol=1e-6)
    assert fast.detection_scores.shape == (len(index),)
    # the plug-in the Engine calls
    obj = objective_for(run)
    assert isinstance(obj, ClipObjective) and obj.views == 1
    with pytest.raises(ManifestMismatchError, match="hash"):
        Engine(run, **kw).score(trained["clean"], [inst])
    with pytest.raises(ConfigError, match="epoch"):
        Engine(run, checkpoints=[9], **kw)
    with pytest.raises(ConfigError, match="draws=1"):
        Engine(run, draws=2, **kw)


def test_pretrain_needs_captions(small, tmp_path):
    with pytest.raises(DataError, match="no caption"):
        pretrain_clip(small["clean"], tmp_path / "r", TINY, progress=False)


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "wrapped"])
def test_foreign_checkpoint_import_round_trip(trained, tmp_path, fmt):
    src = create_clip("ffclip-vit-test", seed=11)
    state = {k: v.contiguous() for k, v in src.clip.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "foreign.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "foreign.pt"
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 32}
        torch.save(obj if fmt == "wrapped" else state, path)
    run = import_clip_checkpoint(path, "ffclip-vit-test", tmp_path / "run",
                                 index=trained["index"], lr=0.5)
    assert run.manifest["objective"]["name"] == "clip_infonce"
    (ckpt,) = run.checkpoints
    assert ckpt.lr == 0.5 and ckpt.optimizer is None
    loaded = load_clip_model(run, ckpt)
    for k, v in state.items():
        assert torch.equal(loaded.clip.state_dict()[k], v), k
    # the imported run scores like any other
    inst = Instance(trained["test"].image(0), trained["test"].image(1))
    res = Engine(run, batch_size=33, progress=False).score(trained["index"], [inst])
    assert np.isfinite(res.scores).all()
    with pytest.raises(DataError, match="already holds a run"):
        import_clip_checkpoint(path, "ffclip-vit-test", tmp_path / "run")


def test_foreign_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "rn.pt"
    torch.save(create_clip("ffclip-rn-test").clip.state_dict(), path)
    with pytest.raises(DataError, match="does not fit"):
        import_clip_checkpoint(path, "ffclip-vit-test", tmp_path / "run")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read"):
        import_clip_checkpoint(tmp_path / "junk.pt", "ffclip-vit-test", tmp_path / "run2")


def test_clip_demo_runs_end_to_end_at_toy_scale(tmp_path):
    from ffengine.clip_demo import run_clip_demo

    r = run_clip_demo("ct", tmp_path / "demo", epochs=1, model="ffclip-vit-test", n_train=120,
                      n_test=40, batch_size=32, progress=False, method="paper")
    assert r["n"] == 126 and r["n_poisoned"] == 6 and r["checkpoints"] == [1]
    for key in ("dacc", "fpr", "fnr", "auc", "asr", "asr_untriggered", "zero_shot_acc"):
        assert 0 <= r[key] <= 1, key
    assert r["top_domain"] is not None and "DACC" in r["report"]
    # the domain-level verdict: the summary's list is the domains.json rows marked suspicious
    rows = json.loads((Path(r["trace"]) / "domains.json").read_text())
    assert r["suspicious_domains"] == [x["domain"] for x in rows if x["suspicious"]]
    assert rows[0]["domain"] == r["top_domain"] and "verdict" in r["report"]
    assert Path(r["trace"]).parent == tmp_path / "demo"
    assert (Path(r["trace"]) / "summary.json").exists()
    assert (tmp_path / "demo" / "instances" / "00" / "x_b.png").exists()
    # a second call reuses the finished trace of the same instance
    again = run_clip_demo("ct", tmp_path / "demo", epochs=1, model="ffclip-vit-test",
                          n_train=120, n_test=40, batch_size=32, progress=False,
                          method="paper")
    assert again["trace"] == r["trace"] and again["auc"] == r["auc"]
    # another method: its own trace directory, five instances; multi-draw methods refused
    last = run_clip_demo("ct", tmp_path / "demo", epochs=1, model="ffclip-vit-test",
                         n_train=120, n_test=40, batch_size=32, progress=False,
                         method="last-x5")
    assert last["n_instances"] == 5 and last["trace"] != r["trace"]
    assert np.load(Path(last["trace"]) / "scores.npy").shape == (126, 5)
    with pytest.raises(ConfigError, match="one-draw"):
        run_clip_demo("ct", tmp_path / "demo", epochs=1, model="ffclip-vit-test",
                      n_train=120, n_test=40, batch_size=32, progress=False,
                      method="last-max16x5")
