"""Label-consistent hardening of clean-label poisons: each poison also carries a small perturbation of its
own that makes its content a worse cue for the contrastive loss, so that the pattern is the cue left.

In a clean-label attack the victim aligns a poison's two views by its content, as it does for every clean
image, and needs the pattern for nothing. Turner et al. (label-consistent backdoors) made supervised poisons
hard to classify by their content, so that the victim leans on the trigger. Each kind here is a perturbation
within +-eps (0-255 scale); the fitted ones take signed gradient steps on the attacker's clean surrogate
encoder, in expectation over the victim's augmentation (fresh draws every step). The pattern is stamped on
top afterwards.

- `views` (the contrastive version of Turner's): lower the cosine between the surrogate's features of two
  independently augmented views of the image, so that the pattern is the one thing the views still share;
- `target` (the opposite bet: a clean-label contrastive backdoor binds the pattern to what the poisons look
  like): raise the cosine between an augmented view's features and the target class's centroid, so that
  the poisons are more typical of the target than the images they were;
- `random`, the control: a seeded perturbation of +-eps in every pixel, the same size with no aim.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cba.errors import ConfigError
from cba.evaluate import to_float

KINDS = ("views", "target", "random")


def standard_format(encoder: nn.Module) -> nn.Module:
    """An evaluation copy of `encoder` with its weights in the standard memory layout.

    A freshly trained encoder holds them channels-last (`cba.train`) and one loaded from a file does not; the CPU
    kernels of the two layouts round differently, and a signed step follows the sign of the gradient, so without
    this a loaded surrogate would fit other poisons than the same surrogate fresh from training."""
    return copy.deepcopy(encoder).eval().to(memory_format=torch.contiguous_format)


def view_agreement(encoder: nn.Module, images: torch.Tensor, augment: nn.Module) -> torch.Tensor:
    """Per-image cosine between the encoder's features of two independent augmented views (float NCHW in [0, 1])."""
    return F.cosine_similarity(encoder(augment(images)), encoder(augment(images)), dim=1)


@torch.no_grad()
def class_centroid(encoder: nn.Module, images: np.ndarray, batch_size: int = 500) -> torch.Tensor:
    """The mean of the encoder's unit-norm features of `images` (uint8 NHWC), itself at unit norm."""
    x = to_float(images)
    encoder = standard_format(encoder)
    features = torch.cat([F.normalize(encoder(x[i:i + batch_size]), dim=1) for i in range(0, len(x), batch_size)])
    return F.normalize(features.mean(0), dim=0)


def harden(images: np.ndarray, encoder: nn.Module | None, eps: float, *, augment: nn.Module | None = None,
           kind: str = "views", anchor: torch.Tensor | None = None, steps: int = 20, seed: int = 0,
           batch_size: int = 250, device: torch.device | None = None) -> np.ndarray:
    """`images` (uint8 NHWC) with a perturbation of at most `eps` (0-255 scale) each, rounded back to uint8.

    The fitted kinds need the attacker's `encoder` and the victim's `augment`; `target` also needs the target
    class's `anchor` (`class_centroid`); `random` needs none of them. Deterministic from `seed`: the
    augmentation draws and the random signs come from torch and numpy streams seeded here."""
    if kind not in KINDS:
        raise ConfigError("kind", kind, f"one of {', '.join(KINDS)}")
    if not 0 < eps <= 255:
        raise ConfigError("eps", eps, "a number in (0, 255]")
    if steps < 1:
        raise ConfigError("steps", steps, "an integer of 1 or more")
    if kind != "random" and (encoder is None or augment is None):
        raise ConfigError("encoder", None, f"an encoder and an augmentation for {kind} hardening")
    if kind == "target" and anchor is None:
        raise ConfigError("anchor", None, "the target class's centroid for target hardening")
    device = device or torch.device("cpu")
    x = to_float(images)
    bound = eps / 255.0
    if kind == "random":
        signs = np.random.default_rng([seed, 0x4A7D]).choice([-1.0, 1.0], size=x.shape)
        delta = torch.as_tensor(signs, dtype=torch.float32) * bound
    else:
        # Only `target` aims at the anchor: `views` ignores one it is given.
        delta = _fitted(x, encoder, augment, anchor if kind == "target" else None, bound, steps, seed, batch_size,
                        device)
    out = (x + delta).clamp(0, 1).mul(255).round().to(torch.uint8)
    return out.permute(0, 2, 3, 1).numpy()


def _fitted(x: torch.Tensor, encoder: nn.Module, augment: nn.Module, anchor: torch.Tensor | None, bound: float,
            steps: int, seed: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Signed steps (2.5 bound / steps each, as Madry et al.'s PGD) that lower the surrogate's view agreement
    (no `anchor`) or raise an augmented view's cosine to the `anchor`."""
    encoder = standard_format(encoder).to(device)
    augment = augment.to(device)
    step = 2.5 * bound / steps
    parts = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(x), batch_size):
            batch = x[start:start + batch_size].to(device)
            delta = torch.zeros_like(batch, requires_grad=True)
            for _ in range(steps):
                views = (batch + delta).clamp(0, 1)
                if anchor is None:
                    loss = view_agreement(encoder, views, augment).mean()
                else:
                    loss = -F.cosine_similarity(encoder(augment(views)), anchor.to(device)[None], dim=1).mean()
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta -= step * grad.sign()
                    delta.clamp_(-bound, bound)
            parts.append(delta.detach().cpu())
    return torch.cat(parts) if parts else torch.zeros_like(x)


@torch.no_grad()
def surrogate_reading(encoder: nn.Module, images: np.ndarray, augment: nn.Module, anchor: torch.Tensor,
                      draws: int = 4, seed: int = 0) -> dict[str, float]:
    """What the attacker's surrogate reads of `images` (uint8 NHWC): the mean view agreement (what `views`
    lowers) and the mean cosine of an augmented view to `anchor` (what `target` raises), over `draws`
    augmentation draws seeded by `seed`, so that two sets of images are read through the same draws."""
    x = to_float(images)
    encoder = standard_format(encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        agreement = [float(view_agreement(encoder, x, augment).mean()) for _ in range(draws)]
        closeness = [float(F.cosine_similarity(encoder(augment(x)), anchor[None], dim=1).mean()) for _ in range(draws)]
    return {"view_agreement": float(np.mean(agreement)), "target_cosine": float(np.mean(closeness))}
