"""The fast path's backbone: batch norms folded into the convolutions (fold_batchnorm)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ffengine.models import build_model
from ffengine.models.resnet import fold_batchnorm

from .conftest import TOLERANCES


def _with_random_statistics(preset: str, rng: torch.Generator) -> nn.Module:
    """An eval-mode model whose batch norms have random running statistics and affine
    parameters (a fresh model's are 0/1: folding them would hardly be tested)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = build_model(preset)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=rng) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=rng) * 2 + 0.05)
                m.weight.copy_(torch.randn(c, generator=rng))
                m.bias.copy_(torch.randn(c, generator=rng) * 0.3)
    return model.eval()


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("hw", [(32, 32), (40, 24)])
def test_folded_backbone_matches_the_saved_one_to_float32_rounding(preset, hw, rng):
    model = _with_random_statistics(preset, rng)
    folded = fold_batchnorm(model.backbone)
    x = torch.rand(6, 3, *hw, generator=rng)
    with torch.no_grad():
        want = model.backbone.double()(x.double())
        got = folded(x)
        plain = model.backbone.float()(x)
    scale = want.abs().max()
    assert scale > 0
    # folded float32 is as close to the float64 truth as the saved float32 model is
    assert (got.double() - want).abs().max() <= TOLERANCES[torch.float32] * scale
    assert (plain.double() - want).abs().max() <= TOLERANCES[torch.float32] * scale
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_folding_copies_and_refuses_training_mode(rng):
    model = _with_random_statistics("tiny", rng)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorm(model.backbone)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(model.train().backbone)


def test_engine_folds_its_backbone_and_the_reference_does_not(tmp_path):
    """The fast path scores with the folded backbone; the reference with the saved model
    (tests/test_pipeline.py compares their scores on real images)."""
    from ffengine.data.augment import AugmentConfig
    from ffengine.data.index import index_arrays
    from ffengine.engine.instance import Instance
    from ffengine.engine.scoring import Engine
    from ffengine.models.resnet import MODEL_PRESETS
    from ffengine.run import Run, new_manifest, save_checkpoint

    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
    index = index_arrays(images, tmp_path / "index")
    net = build_model("tiny")
    manifest = new_manifest(MODEL_PRESETS["tiny"], AugmentConfig(), str(index.path),
                            index.hash, 0.5, {"batch_size": 4}, "test")
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run", manifest, net, None, 1, 1, 1e-3)
    inst = Instance(images[0], images[1], {})
    for reference in (False, True):
        eng = Engine(Run(tmp_path / "run"), reference=reference, progress=False)
        model = eng.prepare([inst], index).models[0]
        norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bool(norms) == reference
        assert isinstance(model.head.bn, nn.BatchNorm1d)  # the scored head stays as saved
