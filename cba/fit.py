"""One SGD loop for every small optimisation: probes, heads, fine-tunes, unlearning.

They all have one shape: SGD with momentum over a fixed number of epochs of
batches, the rate following `lr_at` step by step (a linear warm-up,
then a cosine down to zero) or held constant. What differs is how an epoch's
batches are drawn and what a batch's loss is, so those are the arguments.
The pretraining loop (`cba.train.train`) keeps its own loop only for what it
adds: the per-sample loss log, checkpoints, per-method views and data parallelism.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch

from cba.progress import tqdm


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """The rate at `step` of `total`: linear warm-up over `warmup` steps, then a cosine down to zero."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


def fit(parameters: Iterable[torch.nn.Parameter], batches: Callable[[int], Sequence[Any]],
        loss: Callable[[Any], torch.Tensor | None], *, epochs: int, lr: float, momentum: float = 0.9,
        weight_decay: float = 0.0, nesterov: bool = False, warmup_steps: int = 0, cosine: bool = True,
        on_epoch: Callable[[int], None] | None = None, desc: str | None = None, progress: bool = False) -> int:
    """Minimise `loss(batch)` over `batches(epoch)` for `epochs` epochs; return the number of SGD steps taken.

    `batches(epoch)` is called once at the start of each epoch (so a seeded
    generator is consumed in a fixed order) and must give the same number of
    batches every epoch. A `loss` of None skips the batch without a step; the
    schedule still advances. Parameters that do not require a gradient are left out."""
    params = [p for p in parameters if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    step = taken = 0
    total = None
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress or desc is None):
        if on_epoch is not None:
            on_epoch(epoch)
        epoch_batches = batches(epoch)
        total = total or max(1, len(epoch_batches) * epochs)
        for batch in epoch_batches:
            if cosine:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total, warmup_steps, lr)
            step += 1
            value = loss(batch)
            if value is None:
                continue
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            taken += 1
    return taken
