"""The base class every pretraining method derives from (the registry is in registry.py).

A method owns the backbone and its heads. The training loop calls
`loss(views, labels)` and gets the batch loss plus one loss per sample (for the
learning-dynamics log), then `after_step()` for momentum updates.
All state a method keeps (EMA weights, queues) lives in parameters or buffers,
so one state_dict checkpoints and resumes it.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(dims: list[int], last_bn: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU layers, with a plain linear last layer (optionally batch-normed)."""
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(cin, cout, bias=last and not last_bn))
        if not last:
            layers += [nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(cout, affine=False))
    return nn.Sequential(*layers)


class SSLMethod(nn.Module):
    """Heads + loss around a backbone.

    Subclasses set `num_views` (augmented views per image), `augmentation`
    ("ssl" for the contrastive pipeline, "weak" for crop+flip), `uses_labels`
    and `default_lr` (the SGD rate `pretrain.lr: auto` picks, at batch size
    256, measured on the built-in data), and implement `loss`.
    """

    num_views = 2
    augmentation = "ssl"
    uses_labels = False
    default_lr = 0.3

    def __init__(self, backbone: nn.Module, num_classes: int = 10):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss: what DistributedDataParallel calls when the method trains on several processes."""
        return self.loss(views, labels)

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (scalar batch loss, per-sample loss of shape (B,), detached)."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Called after each optimizer step; `progress` runs from 0 to 1 over training."""
