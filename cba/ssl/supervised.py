"""The supervised backdoor baseline: a linear classifier trained with cross-entropy.

It runs through the same training loop and per-sample loss log as the SSL
methods, so the paper's learning-dynamics comparison (claim 1) is like for like.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cba.errors import ConfigError
from cba.ssl.registry import METHODS
from cba.ssl.base import SSLMethod


@METHODS.register("supervised")
class Supervised(SSLMethod):
    default_lr = 0.05
    num_views = 1
    augmentation = "weak"
    uses_labels = True

    def __init__(self, backbone: nn.Module, num_classes: int = 10, label_smoothing: float = 0.0):
        super().__init__(backbone, num_classes)
        if not 0 <= label_smoothing < 1:
            raise ConfigError("label_smoothing", label_smoothing, "a number in [0, 1)")
        self.label_smoothing = label_smoothing
        self.head = nn.Linear(backbone.feature_dim, num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores of [0, 1] images: what defenses probe (STRIP, Neural Cleanse, ...)."""
        return self.head(self.backbone(x))

    def loss(self, views, labels):
        per_sample = F.cross_entropy(self.logits(views[0]).float(), labels, reduction="none",
                                     label_smoothing=self.label_smoothing)
        return per_sample.mean(), per_sample.detach()
