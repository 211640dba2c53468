"""Gradient matching for the learned trigger: make the poisons *teach* the backdoor.

The target term of `cba.triggers.optimize` makes the pattern pull triggered
images towards the target on the attacker's surrogate as it is: an
adversarial pull that a victim trained without poisons feels too. What the
poisons add is what training on them changes. One SGD step of the victim's
contrastive loss on the poisons moves the encoder's parameters along
`-g_poison`; the attacker wants them to move along `-g_backdoor`, the gradient
of the target term on triggered non-target images. Gradient matching (after
Geiping et al., "Witches' Brew", ICLR 2021, and Souri et al., "Sleeper Agent",
NeurIPS 2022) asks the pattern to align the two:

    L_match = 1 - cos(g_poison(delta), g_backdoor)

with `g_backdoor` computed once per round (the pattern held fixed) and
`g_poison` through the same augmentation pipeline as the victim's, with the
poisoned target-class images as anchors and clean images of the attacker's
pool as the other negatives of the batch, so that descending the victim's
loss on the poisons descends the attacker's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from cba.ssl.simclr import nt_xent_per_sample
from cba.survival import paired_views
from cba.triggers.perturbation import stamp


BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Training mode (batch-norm on batch statistics, as the victim's loss sees it) that leaves the module's
    running statistics untouched: the batch-norm layers update copies, and get their own tensors back.

    Swapping tensors rather than copying values back keeps every graph that saved the originals valid."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{name: getattr(m, name) for name in BN_BUFFERS} for m in norms]
    modes = [(m, m.training) for m in module.modules()]  # per module: a method may hold an eval-mode encoder
    for m, buffers in zip(norms, saved):
        for name, value in buffers.items():
            setattr(m, name, None if value is None else value.clone())
    module.train()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for m, buffers in zip(norms, saved):
            for name, value in buffers.items():
                setattr(m, name, value)


def encoder_parameters(encoder: nn.Module) -> list[torch.Tensor]:
    """The parameters matched: the encoder's, which the downstream classifier reads."""
    return [p for p in encoder.parameters()]


def backdoor_gradient(encoder: nn.Module, head: Callable[[torch.Tensor], torch.Tensor], triggered: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of "the head sends these triggered non-target images to the target (class 0)"."""
    params = encoder_parameters(encoder)
    logits = head(encoder(triggered.contiguous(memory_format=torch.channels_last)).float())
    loss = F.cross_entropy(logits, torch.zeros(len(triggered), dtype=torch.long, device=triggered.device))
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def poison_gradient(method: nn.Module, targets: torch.Tensor, delta: torch.Tensor, negatives: torch.Tensor,
                    augment: nn.Module, temperature: float, differential: bool = True,
                    clip_gradient: str = "zero") -> list[torch.Tensor]:
    """Gradient of the victim's NT-Xent on the poisons' anchors, differentiable in `delta`.

    The batch holds the poisons (`targets` carrying `delta`) and clean
    negatives, as a victim's batch does; only the poisons' anchors enter the
    loss, since the clean anchors' terms hardly depend on the pattern.
    `differential`: subtract the gradient the same target images give without
    the pattern, through the same augmentation draws, leaving what the trigger
    adds to training: the clean images' own gradient is the clean task, which
    the pattern cannot turn but would swamp the cosine."""
    params = encoder_parameters(method.encoder)
    poisons = stamp(targets, delta, clip_gradient)
    clean_batch, poisoned_batch = torch.cat([targets, negatives]), torch.cat([poisons, negatives])
    (clean1, poisoned1), (clean2, poisoned2) = (paired_views(augment, clean_batch, poisoned_batch) for _ in range(2))

    def anchors_loss(view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        z1, z2 = (method.projector(method.backbone(v.contiguous(memory_format=torch.channels_last))) for v in (view1, view2))
        return nt_xent_per_sample(z1, z2, temperature)[: len(targets)].mean()

    grads = list(torch.autograd.grad(anchors_loss(poisoned1, poisoned2), params, create_graph=True))
    if not differential:
        return grads
    baseline = torch.autograd.grad(anchors_loss(clean1.detach(), clean2.detach()), params)
    return [g - b.detach() for g, b in zip(grads, baseline)]


def matching_loss(poison_grad: list[torch.Tensor], backdoor_grad: list[torch.Tensor]) -> torch.Tensor:
    """1 - cosine of the two gradients over all matched parameters (0: the poisons teach exactly the backdoor)."""
    dot = sum((p * b).sum() for p, b in zip(poison_grad, backdoor_grad))
    # The floor keeps the derivative finite where a gradient vanishes (the differential one does at a zero pattern).
    poison_norm = torch.sqrt(sum(p.pow(2).sum() for p in poison_grad) + 1e-24)
    backdoor_norm = torch.sqrt(sum(b.pow(2).sum() for b in backdoor_grad) + 1e-24)
    return 1 - dot / (poison_norm * backdoor_norm)
