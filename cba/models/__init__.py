"""Backbone registry. Every backbone maps [0, 1] images (N, 3, H, W) to flat features."""

from cba.models.registry import BACKBONES, build_backbone
from cba.models import convnet, resnet  # noqa: F401  (registration)

__all__ = ["BACKBONES", "build_backbone"]
