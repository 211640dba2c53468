"""Linear probes on frozen features: the linear-evaluation protocol.

`fit_linear_probe` is the protocol every evaluation uses: multinomial logistic
regression on standardised features, solved to convergence by full-batch
L-BFGS, with the weight decay chosen on a held-out split and the chosen model
refitted on all the data. Its objective is scikit-learn's
`LogisticRegression(C=...)` divided by C·N:

    mean cross-entropy + weight_decay / 2 · ||W||²   (the bias is not penalised)

so `weight_decay = 1 / (C · N)`. A probe trained by a few SGD epochs stops
short of this optimum, and where it stops depends on the schedule; a converged
probe answers "what does a linear readout of these features do" on its own.

`train_linear_probe` (mini-batch SGD for a fixed number of epochs) stays for
heads that are one step inside a larger optimisation, such as the learned
trigger's stand-in for the victim's probe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cba.errors import ConfigError
from cba.fit import fit
from cba.io import load_tensors, save_tensors

WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)
VAL_FRACTION = 0.2
MAX_ITER = 1000
GRAD_TOLERANCE = 1e-5  # largest gradient entry at which L-BFGS counts as converged


class LinearProbe(nn.Module):
    """A linear classifier on standardised frozen features."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(len(mean), num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)


def save_probe(path: str | os.PathLike, probe: LinearProbe) -> None:
    save_tensors(path, probe.state_dict())


def load_probe(path: str | os.PathLike) -> LinearProbe:
    """A probe `save_probe` wrote (safetensors: never unpickled)."""
    state = load_tensors(path)
    if not {"mean", "std", "linear.weight", "linear.bias"} <= set(state):
        raise ConfigError("path", str(path), "a linear-probe file written by cba finetune")
    probe = LinearProbe(state["mean"], state["std"], state["linear.weight"].shape[0])
    probe.load_state_dict(state)
    return probe.eval()


@dataclass
class ProbeFit:
    """A fitted probe and how it was chosen: held-out ACC per weight decay, and the final solve's convergence."""

    probe: LinearProbe
    weight_decay: float
    val_acc: dict[float, float] = field(default_factory=dict)
    iterations: int = 0
    grad_max: float = 0.0

    @property
    def converged(self) -> bool:
        return self.grad_max <= GRAD_TOLERANCE

    def summary(self) -> dict:
        return {"weight_decay": self.weight_decay, "iterations": self.iterations, "grad_max": self.grad_max,
                "converged": self.converged, "val_acc": {f"{wd:g}": acc for wd, acc in self.val_acc.items()}}


def check_probe_options(weight_decays, val_fraction: float, max_iter: int) -> tuple[float, ...]:
    """The options, checked; errors name the option as `finetune.linear` spells it."""
    if not isinstance(weight_decays, (list, tuple)) or not weight_decays or any(
            isinstance(wd, bool) or not isinstance(wd, (int, float)) or not wd >= 0 for wd in weight_decays):
        raise ConfigError("weight_decays", weight_decays, "a non-empty list of numbers >= 0")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError("val_fraction", val_fraction, "a number in (0, 1)")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError("max_iter", max_iter, "an integer >= 1")
    return tuple(sorted({float(wd) for wd in weight_decays}, reverse=True))


def _solve(z: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int,
           start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Minimise the probe objective on standardised float64 features `z`; returns (W, b, iterations, max |grad|)."""
    weight = (start[0].clone() if start else torch.zeros(num_classes, z.shape[1], dtype=z.dtype)).requires_grad_()
    bias = (start[1].clone() if start else torch.zeros(num_classes, dtype=z.dtype)).requires_grad_()
    # float32 cannot resolve gradients as small as GRAD_TOLERANCE; its runs stop on their own scale.
    tolerance = GRAD_TOLERANCE if z.dtype == torch.float64 else max(GRAD_TOLERANCE, 1e-4)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tolerance,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(objective)
    objective()  # gradients at the final point
    grad_max = float(torch.cat([weight.grad.abs().flatten(), bias.grad.abs()]).max())
    iterations = int(opt.state[weight].get("n_iter", 0))
    return weight.detach(), bias.detach(), iterations, grad_max


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     weight_decays=WEIGHT_DECAYS, val_fraction: float = VAL_FRACTION, max_iter: int = MAX_ITER,
                     seed: int = 0) -> ProbeFit:
    """The converged linear probe, its weight decay chosen by held-out accuracy (ties go to the larger decay)."""
    grid = check_probe_options(weight_decays, val_fraction, max_iter)
    labels = torch.as_tensor(labels).long()
    mean, std = features.float().mean(0), features.float().std(0).clamp_min(1e-6)
    z = ((features.float() - mean) / std).double()
    val_acc: dict[float, float] = {}
    solutions: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    if len(grid) > 1:
        # The sweep only ranks the decays, so it runs in float32 (twice as fast); the final fit is float64.
        order = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(round(val_fraction * len(z))))
        val, fit = order[:n_val], order[n_val:]
        z32 = z.float()
        start = None
        for wd in grid:  # strongest decay first: each solution warm-starts the next, weaker one
            weight, bias, _, _ = _solve(z32[fit], labels[fit], num_classes, wd, max_iter, start)
            start = solutions[wd] = (weight, bias)
            val_acc[wd] = float(((z32[val] @ weight.T + bias).argmax(1) == labels[val]).double().mean())
    best = max(grid, key=lambda wd: (val_acc.get(wd, 0.0), wd))
    start = tuple(t.double() for t in solutions[best]) if best in solutions else None
    weight, bias, iterations, grad_max = _solve(z, labels, num_classes, best, max_iter, start)
    probe = LinearProbe(mean, std, num_classes)
    with torch.no_grad():
        probe.linear.weight.copy_(weight.float())
        probe.linear.bias.copy_(bias.float())
    return ProbeFit(probe.eval(), best, val_acc, iterations, grad_max)


def train_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 100, lr: float = 0.1,
    weight_decay: float = 1e-4, batch_size: int = 1024, seed: int = 0,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy, desc: str | None = None,
    progress: bool = False,
) -> LinearProbe:
    """Mini-batch SGD of a probe on CPU-resident features (seconds), the rate on a cosine; stops after
    `epochs`, converged or not. `loss(logits, labels)` is the batch's mean loss (cross-entropy by default)."""
    features = features.float()
    labels = torch.as_tensor(labels).long()
    with torch.random.fork_rng():  # the initialisation, too, comes from `seed`
        torch.manual_seed(seed)
        probe = LinearProbe(features.mean(0), features.std(0).clamp_min(1e-6), num_classes)
    gen = torch.Generator().manual_seed(seed)
    fit(probe.parameters(), lambda _: torch.randperm(len(features), generator=gen).split(batch_size),
        lambda idx: loss(probe(features[idx]), labels[idx]), epochs=epochs, lr=lr, weight_decay=weight_decay,
        desc=desc, progress=progress)
    return probe.eval()


@torch.no_grad()
def probe_predict(probe: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return probe(features.float()).argmax(1)
