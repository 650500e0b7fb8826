"""CIFAR ResNet (3x3 stem, no max-pool) with the SimCLR projection head.

The head is ``Linear(d, hidden, bias=False) - BatchNorm1d - ReLU - Linear(hidden, out)``;
its parameters are what the scorer differentiates (DESIGN.md §2).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Architecture as data (stored in every run manifest)."""

    widths: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    head_hidden: int = 512
    out_dim: int = 128

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        try:
            return cls(widths=tuple(d["widths"]), blocks=tuple(d["blocks"]),
                       head_hidden=int(d["head_hidden"]), out_dim=int(d["out_dim"]))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"model config {d!r} is incomplete ({e}); expected keys "
                              "widths, blocks, head_hidden, out_dim.") from e


MODEL_PRESETS: dict[str, ModelConfig] = {
    # CIFAR ResNet-18, 512-d features.
    "resnet18": ModelConfig(),
    # One BasicBlock a stage, 256-d: the bundled demo run (75 epochs on 5,500 images in
    # about an hour on 2 AVX512 cores without bf16 units).
    "small": ModelConfig(widths=(32, 64, 128, 256), blocks=(1, 1, 1, 1), head_hidden=256),
    # Half of "small"'s width: twice as fast, but PE-II at 10% had not taken by epoch 45
    # (ASR 0.10 vs 0.05 untriggered), where "small" takes.
    "mini": ModelConfig(widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1), head_hidden=128),
    # For tests: seconds.
    "tiny": ModelConfig(widths=(8, 16), blocks=(1, 1), head_hidden=16, out_dim=8),
}


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Backbone: (N, 3, H, W) float images -> (N, widths[-1]) features."""

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...]):
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ConfigError(f"widths {widths} and blocks {blocks} must be non-empty and of "
                              "equal length (one entry per stage).")
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, c_in = [], widths[0]
        for stage, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for b in range(n):
                layers.append(BasicBlock(c_in, w, 2 if (stage > 0 and b == 0) else 1))
                c_in = w
        self.layers = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def fold_batchnorm(backbone: CifarResNet) -> CifarResNet:
    """A copy of an eval-mode backbone with every BatchNorm folded into the convolution
    before it (a per-channel affine map of fixed statistics: the same features up to float32
    rounding, 2e-7 relative on the demo's model). Inference only: the folded batch norms no
    longer learn. Each BatchNorm pass over the activations goes away: on the dev CPU the
    demo's eager backbone ran 1.04x faster in 64-view forwards and 1.15x in 256-view ones
    (bench/experiments/backbone_batch_ab.py), ResNet-18 1.05x (bench/throughput.py). Raises if
    the backbone is in training mode."""
    if backbone.training:
        raise ValueError("fold_batchnorm folds the running statistics of an eval-mode "
                         "backbone; call .eval() first.")
    out = copy.deepcopy(backbone)

    def fold(conv: nn.Module, bn: nn.Module) -> tuple[nn.Module, nn.Module]:
        return fuse_conv_bn_eval(conv, bn), nn.Identity()

    out.stem[0], out.stem[1] = fold(out.stem[0], out.stem[1])
    for block in out.layers:
        block.conv1, block.bn1 = fold(block.conv1, block.bn1)
        block.conv2, block.bn2 = fold(block.conv2, block.bn2)
        if len(block.shortcut):
            block.shortcut[0], block.shortcut[1] = fold(block.shortcut[0], block.shortcut[1])
    return out


class ProjectionHead(nn.Module):
    """SimCLR head: fc1 (no bias) -> bn -> relu -> fc2."""

    def __init__(self, d_in: int, hidden: int, out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(h))))


class SimCLRModel(nn.Module):
    """``f(x) = head(backbone(x))``: the embedding the cosine of DESIGN.md §2 is taken on."""

    # ImageNet-style normalization constants of CIFAR-10, applied inside the model so every
    # caller feeds [0, 1] images.
    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = CifarResNet(config.widths, config.blocks)
        self.head = ProjectionHead(self.backbone.out_dim, config.head_hidden, config.out_dim)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of [0, 1] images (N, 3, H, W)."""
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(config: ModelConfig | str | dict = "resnet18") -> SimCLRModel:
    if isinstance(config, str):
        if config not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {config!r}; expected one of "
                              f"{sorted(MODEL_PRESETS)} or a ModelConfig.")
        config = MODEL_PRESETS[config]
    elif isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return SimCLRModel(config)


__all__ = ["BasicBlock", "CifarResNet", "ModelConfig", "ProjectionHead", "SimCLRModel",
           "build_model", "fold_batchnorm"]
