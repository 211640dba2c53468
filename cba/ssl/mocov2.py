"""MoCo v2 (Chen et al. 2020), symmetrised: a momentum key encoder and a queue
of past keys as negatives.

One device has no cross-GPU shuffling BN. Without it, a query and its positive
key share batch statistics that the queued negatives lack, and the model can
cheat through them (MoCo paper, Sec. 3.3). So the key encoder sees the batch
shuffled and cut into `shuffle_bn_splits` sub-batches, as MoCo's own
single-GPU CIFAR demo does; 1 turns this off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cba import distributed
from cba.errors import ConfigError
from cba.ssl.registry import METHODS
from cba.ssl.base import SSLMethod
from cba.ssl.byol import check_momentum, ema_update, frozen_copy


def infonce_per_sample(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """-log softmax of the positive among [q.k+, q.queue] / T, per query: (B,).

    q, k and the queue rows are unit vectors; the positive sits at logit 0.
    """
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue.T
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device), reduction="none")


@METHODS.register("mocov2")
class MoCoV2(SSLMethod):
    default_lr = 0.06

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 10,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        temperature: float = 0.2,
        queue_size: int = 4096,
        ema_momentum: float = 0.99,
        shuffle_bn_splits: int = 4,
    ):
        super().__init__(backbone, num_classes)
        check_momentum(ema_momentum)
        if not temperature > 0:
            raise ConfigError("temperature", temperature, "a positive number")
        if not (isinstance(queue_size, int) and queue_size >= 1):
            raise ConfigError("queue_size", queue_size, "a positive integer")
        if not (isinstance(shuffle_bn_splits, int) and shuffle_bn_splits >= 1):
            raise ConfigError("shuffle_bn_splits", shuffle_bn_splits, "a positive integer")
        self.temperature, self.momentum, self.splits = temperature, ema_momentum, shuffle_bn_splits
        # MoCo v2's head: a plain 2-layer MLP, no BN (BN would add another batch-statistics leak).
        self.projector = nn.Sequential(
            nn.Linear(backbone.feature_dim, proj_hidden_dim), nn.ReLU(inplace=True), nn.Linear(proj_hidden_dim, proj_dim)
        )
        self.key_backbone = frozen_copy(backbone)
        self.key_projector = frozen_copy(self.projector)
        # Buffers, so checkpoints carry the queue and resume exactly.
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def queue_size(self) -> int:
        return self.queue.shape[0]

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> torch.Tensor:
        """Unit keys from the momentum encoder, BN statistics from shuffled sub-batches."""
        def encode(batch: torch.Tensor) -> torch.Tensor:
            return self.key_projector(self.key_backbone(batch))

        splits = min(self.splits, len(x) // 2)  # every sub-batch keeps >= 2 samples for BN
        if not self.training or splits <= 1:
            return F.normalize(encode(x).float(), dim=1)
        perm = torch.randperm(len(x), device=x.device)
        k = torch.cat([encode(chunk) for chunk in x[perm].tensor_split(splits)])
        return F.normalize(k[perm.argsort()].float(), dim=1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest entries with `keys`, wrapping around the ring buffer.

        Keys are re-normalised so the queue stays on the unit sphere whatever
        the caller passes; if more keys come than fit, the newest are kept.
        """
        keys = F.normalize(keys.detach().to(self.queue.dtype), dim=1)[-self.queue_size:]
        ptr = int(self.queue_ptr)
        slots = (ptr + torch.arange(len(keys), device=self.queue.device)) % self.queue_size
        self.queue[slots] = keys
        self.queue_ptr[0] = (ptr + len(keys)) % self.queue_size

    @torch.no_grad()
    def momentum_update(self, tau: float | None = None) -> None:
        tau = self.momentum if tau is None else tau
        ema_update(self.key_backbone, self.backbone, tau)
        ema_update(self.key_projector, self.projector, tau)

    def loss(self, views, labels):
        q1, q2 = (self.query(v) for v in views)
        k1, k2 = (self.key(v) for v in views)
        negatives = self.queue.clone()  # enqueue below must not alter what backward needs
        per_sample = (infonce_per_sample(q1, k2, negatives, self.temperature)
                      + infonce_per_sample(q2, k1, negatives, self.temperature)) / 2
        if self.training:  # evaluation calls (e.g. defenses scoring samples) leave the queue alone
            self.enqueue(torch.cat([distributed.gather_detached(k1), distributed.gather_detached(k2)]))  # every rank's keys
        return per_sample.mean(), per_sample.detach()

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        self.momentum_update()
