"""SimCLR (Chen et al. 2020): a projection MLP and the NT-Xent loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cba import distributed
from cba.errors import ConfigError
from cba.ssl.registry import METHODS
from cba.ssl.base import SSLMethod, mlp


def nt_xent_per_sample(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent for each of the 2B anchors, averaged over a sample's two views: (B,).

    Each view's positive is the other view of the same image; the other 2B-2
    views in the batch are its negatives.
    """
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    per_anchor = F.cross_entropy(logits, targets, reduction="none")
    return (per_anchor[:b] + per_anchor[b:]) / 2


@METHODS.register("simclr")
class SimCLR(SSLMethod):
    default_lr = 0.6

    def __init__(self, backbone: nn.Module, num_classes: int = 10, proj_hidden_dim: int = 512, proj_dim: int = 128, temperature: float = 0.5):
        super().__init__(backbone, num_classes)
        if not temperature > 0:
            raise ConfigError("temperature", temperature, "a positive number")
        self.temperature = temperature
        self.projector = mlp([backbone.feature_dim, proj_hidden_dim, proj_dim])

    def loss(self, views, labels):
        z1, z2 = (distributed.gather(self.projector(self.backbone(v))) for v in views)
        # Every rank scores the global batch (the negatives of all ranks) and keeps its own anchors.
        per_sample = distributed.shard(nt_xent_per_sample(z1, z2, self.temperature))
        return per_sample.mean(), per_sample.detach()
