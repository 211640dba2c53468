"""What the trigger fit optimises: one universal pattern, or a generator of per-image patterns.

Both keep every pixel of the perturbation within +-eps (0-1 scale) by
construction, so the objective never sees an image outside the budget:

- `UniversalPattern`: a grid of values, bilinearly upsampled to the image and
  moved by signed-gradient steps, then clipped to the budget (the learned
  trigger of CTRL-like attacks: the same delta on every image);
- `GeneratedPattern`: delta(x) = eps * tanh(G(x)) for a small convolutional
  generator G trained with Adam (BLTO's form, Sun et al. ICLR 2024). Because
  delta depends on the image, it can work against the image's own evidence
  (a square's corners) instead of only adding evidence for the target.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cba.triggers.base import CHUNK, to_uint8


class PatternGenerator(nn.Module):
    """Three 3x3 convolutions at full resolution (the middle one dilated): a 9-pixel receptive field, output in (-1, 1)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(hidden, 3, 3, padding=1),
        )
        # Start near a zero perturbation, as the universal pattern does, so early steps are not noise.
        nn.init.normal_(self.body[-1].weight, std=1e-3)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x * 2 - 1))


def stamp(x: torch.Tensor, delta: torch.Tensor, clip_gradient: str = "zero") -> torch.Tensor:
    """Triggered images x + delta, clipped to [0, 1] as the poisons will be.

    `zero`: the clip's exact gradient, zero wherever it clips. A pattern value
    that a black (or white) pixel clips away then gets no signal, however much
    the objective would gain from its opposite sign, and stays where the first
    step left it. `straight_through`: the forward pass is the same, but the
    gradient passes the clip as if it were the identity, so such a value is
    told which way it should move."""
    raw = x + delta
    clipped = raw.clamp(0, 1)
    if clip_gradient == "straight_through":
        return raw + (clipped - raw).detach()
    return clipped


def _check_finite(grads, round_index: int) -> None:
    if not all(torch.isfinite(g).all() for g in grads if g is not None):
        raise FloatingPointError(f"the trigger objective's gradient is not finite in round {round_index + 1}")


class UniversalPattern:
    """One pattern for every image: a `resolution`-sided grid, signed-gradient steps of `step_size * eps`.

    `symmetric`: the pattern is its own left-right mirror image, so a flipped
    view carries the same pattern as an unflipped one (the grid is read as the
    mean of itself and its mirror; from a zero start its signed steps keep it
    symmetric, since the gradient they follow is)."""

    def __init__(self, size: int, resolution: int, eps: float, step_size: float, device: torch.device,
                 symmetric: bool = False):
        self.size, self.resolution, self.eps, self.step = size, min(resolution, size), eps, step_size * eps
        self.symmetric = symmetric
        self.grid = torch.zeros(1, 3, self.resolution, self.resolution, device=device, requires_grad=True)

    def _upsample(self, values: torch.Tensor) -> torch.Tensor:
        # Mirroring and bilinear interpolation (align_corners=False commutes with a flip) keep values within the budget.
        if self.symmetric:
            values = (values + values.flip(-1)) / 2
        if self.resolution == self.size:
            return values
        return F.interpolate(values, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._upsample(self.grid)

    def update(self, loss: torch.Tensor, round_index: int) -> None:
        grad, = torch.autograd.grad(loss, self.grid)
        _check_finite([grad], round_index)
        with torch.no_grad():
            self.grid.sub_(self.step * grad.sign()).clamp_(-self.eps, self.eps)

    @torch.no_grad()
    def pattern(self) -> np.ndarray:
        """The pattern on the 0-255 scale, (H, W, 3), exactly within budget despite float rounding."""
        values = self._upsample(self.grid)[0].permute(1, 2, 0).cpu().numpy() * 255.0
        return np.clip(values, -self.eps * 255.0, self.eps * 255.0).astype(np.float32)

    def apply_uint8(self, images: np.ndarray) -> np.ndarray:
        return to_uint8(images + self.pattern())


class GeneratedPattern:
    """delta(x) = eps * G(x), G a `PatternGenerator` trained with Adam at rate `lr`."""

    def __init__(self, generator: PatternGenerator, eps: float, lr: float):
        self.generator, self.eps = generator, eps
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=lr)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.eps * self.generator(x)

    def update(self, loss: torch.Tensor, round_index: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _check_finite([p.grad for p in self.generator.parameters()], round_index)
        self.optimizer.step()

    def apply_uint8(self, images: np.ndarray) -> np.ndarray:
        return apply_generator(self.generator, images, self.eps * 255.0)


@torch.no_grad()
def apply_generator(generator: PatternGenerator, images: np.ndarray, linf: float) -> np.ndarray:
    """Triggered uint8 copy of uint8 NHWC `images`: x + linf * G(x) on the 0-255 scale, chunk by chunk."""
    generator.eval()
    device = next(generator.parameters()).device
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        chunk = torch.as_tensor(images[start:start + CHUNK]).to(device).permute(0, 3, 1, 2).float() / 255
        delta = (generator(chunk) * linf).clamp(-linf, linf).permute(0, 2, 3, 1).cpu().numpy()
        out[start:start + CHUNK] = to_uint8(images[start:start + CHUNK].astype(np.float64) + delta)
    return out
