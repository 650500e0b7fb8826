"""Models: the CIFAR ResNet with its SimCLR projection head."""

from .resnet import MODEL_PRESETS, ModelConfig, SimCLRModel, build_model

__all__ = ["MODEL_PRESETS", "ModelConfig", "SimCLRModel", "build_model"]
