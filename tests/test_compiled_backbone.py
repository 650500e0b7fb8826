"""The compiled backbone forward and colour stage against eager: same outputs to rounding on
fresh random models and inputs, a clear fallback where compiling fails or disagrees, and the
rule that decides when "auto" compiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffengine.data.augment import AugmentConfig, augment_batch, colour_ops
from ffengine.engine import compiled_backbone as cb
from ffengine.engine.compiled_backbone import (
    AUTO_MIN_IMAGES,
    BackboneRunner,
    ColourRunner,
    resolve_compile,
)
from ffengine.engine.scoring import Engine
from ffengine.errors import ConfigError
from ffengine.models import ModelConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(widths=(4, 8), blocks=(1, 1), head_hidden=13, out_dim=7)


def random_model(gen: torch.Generator) -> torch.nn.Module:
    """A tiny model with random weights and non-trivial BatchNorm statistics (eval mode)."""
    m = build_model(CFG)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen) * 0.3)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
    return m.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_auto_compiles_large_simclr_passes_on_a_gpu_only():
    gpu = torch.device("cuda")  # a device name only: nothing runs there
    assert resolve_compile("auto", AUTO_MIN_IMAGES, compilable=True, reference=False, device=gpu)
    assert not resolve_compile("auto", AUTO_MIN_IMAGES - 1, compilable=True, reference=False,
                               device=gpu)
    # a CPU: the folded eager backbone is as fast as the compiled one there
    assert not resolve_compile("auto", 10 * AUTO_MIN_IMAGES, compilable=True, reference=False)
    assert not resolve_compile("auto", 10 * AUTO_MIN_IMAGES, compilable=True, reference=False,
                               device="cpu")
    # the reference is the slow audit path: auto keeps it plain eager
    assert not resolve_compile("auto", 10 * AUTO_MIN_IMAGES, compilable=True, reference=True,
                               device=gpu)
    assert not resolve_compile("auto", 10 * AUTO_MIN_IMAGES, compilable=False, reference=False,
                               device=gpu)
    assert resolve_compile("on", 1, compilable=True, reference=True)
    assert not resolve_compile("off", 10 * AUTO_MIN_IMAGES, compilable=True, reference=False,
                               device=gpu)
    with pytest.raises(ConfigError, match="SimCLR runs only"):
        resolve_compile("on", 1, compilable=False, reference=False)
    with pytest.raises(ConfigError, match="expected one of"):
        resolve_compile("always", 1, compilable=True, reference=False)


def test_compiled_runner_matches_eager_for_every_model_and_batch_size(rng):
    """One compiled function serves models with other weights (weights are inputs, not
    constants folded into the code) and other batch sizes (dynamic shapes)."""
    runner = BackboneRunner(compiled=True)
    with torch.no_grad():
        for model_seed, batch in ((0, 7), (1, 13), (2, 3)):
            model = random_model(torch.Generator().manual_seed(model_seed))
            x = torch.rand(batch, 3, 32, 32, generator=rng)
            got, want = runner(model, x), model.features(x)
            assert runner.compiled, runner.fallback_reason
            assert got.shape == want.shape
            assert rel_err(got, want) <= 1e-5


def test_a_failing_compile_falls_back_to_eager_with_a_warning(monkeypatch, rng):
    def broken(model, x):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cb, "_compiled", broken)
    model, x = random_model(rng), torch.rand(5, 3, 32, 32, generator=rng)
    runner = BackboneRunner(compiled=True)
    with pytest.warns(RuntimeWarning, match="no C.. compiler.*runs eager"):
        got = runner(model, x)
    assert torch.equal(got, model.features(x))
    assert not runner.compiled and "no C++ compiler" in runner.fallback_reason


def test_a_compiled_output_that_disagrees_is_not_used(monkeypatch, rng):
    monkeypatch.setattr(cb, "_compiled", lambda model, x: model.features(x) * 1.01)
    monkeypatch.setattr(cb, "_verified", set())  # as in a fresh process
    model, x = random_model(rng), torch.rand(5, 3, 32, 32, generator=rng)
    runner = BackboneRunner(compiled=True)
    with pytest.warns(RuntimeWarning, match="differs from eager"):
        got = runner(model, x)
    assert torch.equal(got, model.features(x))
    assert not runner.compiled
    # later batches stay eager: the disagreeing function is never called again
    monkeypatch.setattr(cb, "_compiled", lambda model, x: pytest.fail("compiled path used"))
    assert torch.equal(runner(model, x), model.features(x))


def test_engine_scores_compiled_equal_eager_scores_on_real_images(trace_setup):
    """A two-checkpoint tiny run on CIFAR-10 images, two draws: the compiled backbone's
    scores equal eager's to float32 rounding."""
    run, index, inst = trace_setup["run"], trace_setup["index"], trace_setup["instance"]
    res = {}
    for mode in ("off", "on"):
        eng = Engine(run, checkpoints="all", draws=2, batch_size=8, progress=False,
                     compile_backbone=mode)
        res[mode] = eng.score(index, [inst])
        assert eng.backbone_compiled == (mode == "on"), eng.backbone_fallback
        assert eng.colour_compiled == (mode == "on"), eng.colour_fallback
    a, b = res["on"].terms, res["off"].terms
    assert a.shape == b.shape and np.isfinite(b).any()
    scale = np.nanmax(np.abs(b))
    assert np.nanmax(np.abs(a - b)) <= 1e-5 * scale
    assert [i for i, _ in res["on"].skipped] == [i for i, _ in res["off"].skipped]


def test_engine_rejects_an_unknown_compile_mode(trace_setup):
    with pytest.raises(ConfigError, match="expected one of"):
        Engine(trace_setup["run"], compile_backbone="yes", progress=False)


def test_the_eager_check_runs_once_per_architecture_dtype_and_autocast(rng):
    """Other weights of one architecture run the same compiled code (weights are inputs):
    checked once. Another architecture, input dtype or autocast setting is another
    computation: checked again."""
    a, b = random_model(torch.Generator().manual_seed(0)), random_model(rng)
    wider = build_model(ModelConfig(widths=(6, 8), blocks=(1, 1), head_hidden=13, out_dim=7))
    x = torch.rand(2, 3, 32, 32, generator=rng)
    key = cb._check_key(a, x)
    assert cb._check_key(b, x) == key
    assert cb._check_key(wider, x) != key
    assert cb._check_key(random_model(rng).double(), x.double()) != key
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cb._check_key(random_model(rng), x) != key


# -- the augmentation's colour stage ---------------------------------------------------------
# SimCLR's, and one without the hue step and with every gate's probability moved (each
# config compiles once more: its numbers are constants of the compiled code)
COLOUR_CONFIGS = [AugmentConfig(),
                  AugmentConfig(jitter=(0.4, 0.4, 0.4, 0.0), flip_p=0.0, jitter_p=1.0,
                                gray_p=0.5)]


@pytest.mark.parametrize("cfg", COLOUR_CONFIGS, ids=["simclr", "no-hue"])
def test_compiled_colour_stage_matches_eager_for_every_batch_size(cfg, rng):
    """Views in [0, 1]: the compiled stage's pixels within 1e-5 of eager's, for fresh random
    views and uniforms, with and without the hue step, at batch sizes that are not multiples
    of any vector width; and a view does not depend on its batch (the same pixels, bit for
    bit, alone as among 300)."""
    runner = ColourRunner(compiled=True)
    x = torch.rand(300, 3, 32, 32, generator=rng)
    u = torch.rand(300, 7, generator=rng)
    whole = runner(x, u, cfg)
    assert runner.compiled, runner.fallback_reason
    want = colour_ops(x, u, cfg)
    assert (whole - want).abs().max() <= 1e-5
    assert whole.min() >= 0 and whole.max() <= 1
    for b in (1, 7, 13):
        got = runner(x[:b], u[:b], cfg)
        assert (got - colour_ops(x[:b], u[:b], cfg)).abs().max() <= 1e-5
        assert torch.equal(got, whole[:b])


def test_augment_batch_takes_the_compiled_colour_stage(rng):
    """augment_batch with the compiled stage gives eager's views to rounding, padded and
    packed images of mixed sizes included."""
    cfg = AugmentConfig()
    imgs = torch.randint(0, 256, (9, 3, 40, 36), dtype=torch.uint8, generator=rng)
    sizes = np.array([[40, 36], [32, 32], [20, 30], [40, 20], [33, 35], [32, 32],
                      [28, 36], [40, 36], [21, 22]])
    ids = np.arange(100, 109)
    runner = ColourRunner(compiled=True)
    got = augment_batch(imgs, sizes, ids, 3, 5, cfg, colour=runner)
    want = augment_batch(imgs, sizes, ids, 3, 5, cfg)
    assert runner.compiled, runner.fallback_reason
    assert got.shape == want.shape == (9, 3, 32, 32)
    assert (got - want).abs().max() <= 1e-5


def test_a_failing_or_disagreeing_colour_stage_falls_back_to_eager(monkeypatch, rng):
    cfg = AugmentConfig()
    x, u = torch.rand(4, 3, 32, 32, generator=rng), torch.rand(4, 7, generator=rng)
    want = colour_ops(x, u, cfg)

    def broken(x, u, cfg):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cb, "_compiled_colour", broken)
    runner = ColourRunner(compiled=True)
    with pytest.warns(RuntimeWarning, match="no C.. compiler.*colour stage runs eager"):
        got = runner(x, u, cfg)
    assert torch.equal(got, want) and not runner.compiled

    monkeypatch.setattr(cb, "_compiled_colour", lambda x, u, cfg: colour_ops(x, u, cfg) + 0.01)
    monkeypatch.setattr(cb, "_verified", set())  # as in a fresh process
    runner = ColourRunner(compiled=True)
    with pytest.warns(RuntimeWarning, match="colour stage's compiled output differs"):
        got = runner(x, u, cfg)
    assert torch.equal(got, want) and not runner.compiled
    monkeypatch.setattr(cb, "_compiled_colour", lambda *a: pytest.fail("compiled path used"))
    assert torch.equal(runner(x, u, cfg), want)
