"""SimSiam (Chen & He 2021): a predictor and a stop-gradient, no negatives, no EMA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cba.ssl.registry import METHODS
from cba.ssl.base import SSLMethod, mlp


def simsiam_per_sample(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2 per sample: (B,).

    The stop-gradient on z is what keeps SimSiam from collapsing.
    """
    def neg_cos(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=1)

    return (neg_cos(p1, z2) + neg_cos(p2, z1)) / 2


@METHODS.register("simsiam")
class SimSiam(SSLMethod):
    # The best of five rates on the built-in data, on two seeds (docs/results/methods.md); 0.06 learned least.
    default_lr = 0.3

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 10,
        proj_hidden_dim: int = 512,
        proj_dim: int = 512,
        pred_hidden_dim: int = 128,
    ):
        super().__init__(backbone, num_classes)
        # Three layers, BN on the output too (SimSiam Sec. 4.4); the predictor is a bottleneck.
        self.projector = mlp([backbone.feature_dim, proj_hidden_dim, proj_hidden_dim, proj_dim], last_bn=True)
        self.predictor = mlp([proj_dim, pred_hidden_dim, proj_dim])

    def loss(self, views, labels):
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        per_sample = simsiam_per_sample(p1, p2, z1, z2)
        return per_sample.mean(), per_sample.detach()
