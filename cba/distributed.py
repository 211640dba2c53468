"""Data-parallel pretraining over several processes, as launched by torchrun.

    torchrun --no-python --nproc_per_node N cba pretrain

Each process (rank) trains on a disjoint shard of every global batch; gradients
are averaged by DistributedDataParallel. Two things make N processes compute
what one process would on the whole batch:

- **BatchNorm is synchronised**: statistics are taken over the global batch
  (torch's SyncBatchNorm on GPUs; `CrossRankBatchNorm` below on CPUs, where
  torch's refuses to run).
- **Contrastive losses see every rank's negatives**: `gather` concatenates a
  tensor across ranks and sends each rank the gradient that every rank's loss
  puts on its slice.

Both collectives sum gradients in backward, so each rank computes the gradient
of the sum of all ranks' losses; DDP's average of those is the gradient of the
global mean loss. Outside torchrun every helper is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cba.errors import ConfigError
from cba.evaluate import pick_device


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def ranks() -> Ranks:
    """This process's place in the running group (one process, rank 0, outside torchrun)."""
    if not active():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def launched_world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError("WORLD_SIZE", value, "a positive integer, as torchrun sets it")
    return int(value)


def start(device_name: str) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs) and pick this rank's device."""
    if launched_world_size() == 1:
        return Ranks(), pick_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not active():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return ranks(), device


def finish() -> None:
    """Leave the group. No barrier: after training only rank 0 has work left (writing), and a rank
    that failed must not leave the others waiting."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch; slices in rank order rebuild the batch."""
    r = ranks()
    if not r.distributed:
        return batch
    if len(batch) % r.world_size:
        raise ConfigError("batch_size", len(batch), f"a multiple of the {r.world_size} processes")
    size = len(batch) // r.world_size
    return batch[r.rank * size:(r.rank + 1) * size]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss pulls on every slice
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


class _SumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized tensors of all ranks along dim 0, differentiably."""
    return _GatherWithGrad.apply(x) if active() else x


def gather_detached(x: torch.Tensor) -> torch.Tensor:
    return gather(x.detach())


def mean_over_ranks(value: float) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def check_same_everywhere(what: str, digest: str) -> None:
    """Refuse to train when ranks read different files (a stale copy on one node, say)."""
    if not active():
        return
    digests: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise ConfigError(what, f"sha256 {digests[odd[0]][:12]} on rank {odd[0]}",
                          f"the same file on every rank (rank 0 has sha256 {digests[0][:12]})")


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span the global batch of all ranks, on any device.

    Same parameters, buffers and state-dict keys as nn.BatchNorm1d/2d, so saved
    weights load into a plain model. Statistics are two-pass (mean, then the
    centred squares) for the precision of a one-process batch norm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2D, 3D or 4D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor(float(xf.numel() // xf.shape[1]), device=x.device)
        total = _SumWithGrad.apply(torch.cat([xf.sum(dims), count.view(1)]))
        n = total[-1]
        mean = total[:-1] / n
        centred = xf - mean.view(shape)
        var = _SumWithGrad.apply((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * n / (n - 1), alpha=factor)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def synchronise_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Swap every BatchNorm for its cross-rank form (a no-op in one process)."""
    if not active():
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _swap_batchnorm(module)


def _swap_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossRankBatchNorm):
        tensors = [*module.parameters(), *module.buffers()]
        swapped = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats).to(tensors[0].device if tensors else "cpu")
        swapped.load_state_dict(module.state_dict())
        if module.affine:
            swapped.weight.requires_grad_(module.weight.requires_grad)
            swapped.bias.requires_grad_(module.bias.requires_grad)
        swapped.train(module.training)
        return swapped
    for name, child in module.named_children():
        module.add_module(name, _swap_batchnorm(child))
    return module


def wrap(method: nn.Module, device: torch.device) -> nn.Module:
    """The module whose forward the training loop calls: DDP around the method when distributed."""
    if not active():
        return method
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
