"""The backbone registry and the input normalisation every backbone shares."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from cba.errors import ConfigError
from cba.registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")


class Normalize(nn.Module):
    """Fixed normalisation inside the model, so every caller (attacks, defenses,
    trigger inversion) works on plain [0, 1] images."""

    def __init__(self, mean: float = 0.5, std: float = 0.25):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class StagedBackbone(nn.Module):
    """normalize -> stem -> stages -> global pool. Subclasses build `stem`,
    `stages` (stages[-1] is the last stage, the one Fine-Pruning prunes) and
    set `feature_dim`."""

    normalize: Normalize
    stem: nn.Module
    stages: nn.ModuleList
    feature_dim: int

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature maps, before pooling."""
        x = self.stem(self.normalize(x))
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.forward_maps(x), 1), 1)


def build_backbone(name: str, width: int = 32, **options: Any) -> nn.Module:
    factory = BACKBONES.get(name, key="backbone")
    if not isinstance(width, int) or width < 1:
        raise ConfigError("width", width, "a positive integer")
    model = factory(width=width, **options)
    assert hasattr(model, "feature_dim"), "backbones expose feature_dim"
    return model
