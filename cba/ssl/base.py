"""The base class every pretraining method derives from, and its registry.

A method owns the backbone and its heads. The training loop calls
`loss(views, labels)` and gets the batch loss plus one loss per sample (for the
learning-dynamics log), then `after_step()` for momentum updates.
All state a method keeps (EMA weights, queues) lives in parameters or buffers,
so one state_dict checkpoints and resumes it.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from cba.errors import ConfigError, is_int, is_number
from cba.registry import Registry

METHODS: Registry[type["SSLMethod"]] = Registry("pretrain.method")


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


def build_method(name: str, backbone: nn.Module, num_classes: int = 10, **hparams: Any) -> SSLMethod:
    cls = METHODS.get(name, key="pretrain.method")
    signature = inspect.signature(cls.__init__).parameters
    allowed = [p for p in signature if p not in ("self", "backbone", "num_classes")]
    for key, value in hparams.items():
        if key not in allowed:
            raise ConfigError(f"pretrain.{name}.{key}", value, f"{name} takes {', '.join(allowed) or 'no options'}")
        _check_option(f"pretrain.{name}.{key}", value, signature[key].default)
    return cls(backbone, num_classes=num_classes, **hparams)


# Sizes cap what a typo can make us allocate: a 10^9-wide projector would take the machine down.
MAX_OPTION_SIZE = 1 << 20


def _check_option(key: str, value: Any, default: Any) -> None:
    """A method option has its default's type: integer options are sizes (>= 1), float options are
    rates, momenta or temperatures (finite, >= 0; momenta and smoothing at most 1, temperatures > 0)."""
    name = key.rsplit(".", 1)[-1]
    if isinstance(default, bool):
        ok, allowed = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, allowed = is_int(value) and 1 <= value <= MAX_OPTION_SIZE, f"an integer in [1, {MAX_OPTION_SIZE}]"
    elif isinstance(default, float):
        high = 1.0 if ("momentum" in name or "smoothing" in name) else math.inf
        low_ok = (lambda v: v > 0) if "temperature" in name else (lambda v: v >= 0)
        ok = is_number(value) and low_ok(value) and value <= high
        allowed = "a number " + ("> 0" if "temperature" in name else ">= 0") + (" and <= 1" if high == 1.0 else "")
    else:
        return
    if not ok:
        raise ConfigError(key, value, allowed)
