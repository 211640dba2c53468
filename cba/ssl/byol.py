"""BYOL (Grill et al. 2020): an online network predicts an EMA target network.

The EMA helpers here (`frozen_copy`, `ema_update`) are shared with MoCo's key
encoder, so both momentum networks follow one tested formula.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from cba.errors import ConfigError
from cba.ssl.registry import METHODS
from cba.ssl.base import SSLMethod, mlp


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that the optimizer never touches (it skips requires_grad=False).

    Kept as a submodule by the caller, so the copy lives in state_dict and a
    resumed run continues from the same target weights.
    """
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target = tau * target + (1 - tau) * online, parameter by parameter.

    Buffers (BN running statistics) are not averaged: the target network keeps
    its own, updated by its own forward passes, as in the reference code.
    """
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(tau).add_(o.detach(), alpha=1 - tau)


def byol_tau(progress: float, base_tau: float) -> float:
    """The BYOL schedule: base_tau at the start, rising on a cosine to 1 at the end."""
    return 1 - (1 - base_tau) * (math.cos(math.pi * progress) + 1) / 2


def check_momentum(value: float) -> None:
    if not 0 <= value <= 1:
        raise ConfigError("ema_momentum", value, "a number in [0, 1]")


def regression_per_sample(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z) per row, i.e. the squared distance of the unit vectors."""
    return 2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1)


def byol_per_sample(p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """Symmetric BYOL loss per sample: each view's prediction regresses the other
    view's target projection; targets are detached (no gradient into them)."""
    return (regression_per_sample(p1, t2.detach()) + regression_per_sample(p2, t1.detach())) / 2


@METHODS.register("byol")
class BYOL(SSLMethod):
    default_lr = 0.06

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 10,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        pred_hidden_dim: int = 512,
        ema_momentum: float = 0.99,
    ):
        super().__init__(backbone, num_classes)
        check_momentum(ema_momentum)
        self.base_tau = ema_momentum
        self.projector = mlp([backbone.feature_dim, proj_hidden_dim, proj_dim])
        self.predictor = mlp([proj_dim, pred_hidden_dim, proj_dim])
        self.target_backbone = frozen_copy(backbone)
        self.target_projector = frozen_copy(self.projector)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.target_projector(self.target_backbone(x))

    def loss(self, views, labels):
        p1, p2 = (self.predictor(self.projector(self.backbone(v))) for v in views)
        t1, t2 = (self.target(v) for v in views)
        per_sample = byol_per_sample(p1, p2, t1, t2)
        return per_sample.mean(), per_sample.detach()

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        tau = byol_tau(progress, self.base_tau)
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)
