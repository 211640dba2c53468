"""How visible a change to images is: L-inf, L2, PSNR and SSIM of changed (triggered) against clean images."""

from __future__ import annotations

import numpy as np
import torch

from cba.triggers.base import Trigger


def change_metrics(changed: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """Figures over two uint8 NHWC batches of the same images, on the 0-255 scale for the norms.

    `linf` is the largest pixel change, `l2` the mean per-image L2 norm of the
    change, `psnr` (dB) and `ssim` (11x11 Gaussian window) the means over images."""
    from kornia.metrics import ssim  # only the trigger stage and a few benches measure stealth; kornia takes ~0.5 s

    if changed.shape != clean.shape:
        raise ValueError(f"changed images of shape {changed.shape} against clean ones of shape {clean.shape}: "
                         "the shapes must match")
    diff = changed.astype(np.float64) - clean.astype(np.float64)
    clean_t = torch.from_numpy(clean).permute(0, 3, 1, 2).double() / 255
    changed_t = torch.from_numpy(changed).permute(0, 3, 1, 2).double() / 255
    per_image_mse = ((changed_t - clean_t) ** 2).mean(dim=(1, 2, 3))
    # An unchanged image has infinite PSNR; cap at 100 dB so the mean stays finite.
    psnr_values = torch.where(per_image_mse > 0, 10 * torch.log10(1 / per_image_mse.clamp_min(1e-20)),
                              torch.full_like(per_image_mse, 100.0))
    return {
        "linf": float(np.abs(diff).max()) if diff.size else 0.0,
        "l2": float(np.sqrt((diff ** 2).reshape(len(diff), -1).sum(1)).mean()) if diff.size else 0.0,
        "psnr": float(psnr_values.clamp(max=100.0).mean()),
        "ssim": float(ssim(changed_t, clean_t, window_size=11).mean()),
    }


def stealth_metrics(trigger: Trigger, images: np.ndarray, rng: np.random.Generator | None = None) -> dict[str, float]:
    """`change_metrics` of `trigger` stamped on `images` (uint8 NHWC) against the images themselves."""
    return change_metrics(trigger.apply(images, rng=rng), images)
