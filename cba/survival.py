r"""How much of a backdoor trigger survives the SSL augmentation pipeline.

Every trigger is measured on pairs: a clean image x and its triggered copy
x' = trigger.apply(x), both float in [0, 1], (C, H, W). The trigger as the
encoder meets it at test time (un-augmented) is d = x' - x, per image; this is
general enough for additive triggers (ctrl, blend, optimized) and for triggers
that replace pixels (patch, ssl_patch at a random place). A view applies one
random augmentation A, with the SAME random parameters, to both images; what
the view keeps of the trigger is the residual r = A(x') - A(x).

With <a, b> the inner product over channels and pixels, ||a||^2 = <a, a>, and
roll(a, s) the circular 2-D shift of a by s = (s_y, s_x), the measures are

    survival        = E[ max_s <r, roll(d, s)> / ||d||^2 ]
    view_agreement  = E[ max_s <r1, roll(r2, s)> / (||r1|| ||r2||) ]
    batch_agreement = E[ max_s <r_i, roll(r_j, s)> / (||r_i|| ||r_j||) ]
    energy          = E[ ||r||^2 / ||d||^2 ]

E averages over images and random draws (every view counts for survival and
energy). `survival` is the fraction of the test-time trigger that a view still
carries, allowing for translation only (a CNN with global pooling is
translation-equivariant), not for rescaling, blur, flips of asymmetric
patterns or lost colour. Identity gives 1; a factor c on the residual (a
brightness or contrast change) gives c, so it can exceed 1. `view_agreement`
compares two independent views A1, A2 of the same triggered image: contrastive
learning pulls the two views together, so the trigger becomes a feature only
if both carry it. `batch_agreement` pairs image i with image i+1 (cyclically)
under ONE draw: do different triggered images carry the same trigger in one
batch? Only this measure sees the difference between drawing parameters per
sample and per batch; every per-image measure has the same expectation under
both, since one image's view is drawn from the same distribution either way.
`energy` is the energy kept whatever its shape.

The max over shifts is an FFT cross-correlation. It has a chance floor: for a
residual unrelated to d it is still positive, about sqrt(2 ln(HW) / (C H W)) of
the norms for white noise (~0.05-0.07 at 32x32x3), and higher for narrow-band
patterns such as CTRL's, whose shifted copies match any nearby frequency in
part. Survival is signed: a view that carries -d (a flip of a left-right
antisymmetric pattern, as CTRL's default is) scores at chance, although a
sign-blind feature would still see it. A residual with energy below
ZERO_ENERGY * ||d||^2 counts as zero (agreement 0), so float noise left after
e.g. grayscale of a pure-chroma trigger is not read as a pattern. Images with
d == 0 (the trigger changed nothing, e.g. an unfitted optimized trigger) are
skipped and counted in `skipped`; if all are, the measures are NaN.

Parameters are drawn once, on x, and replayed on x' through kornia's API: every
augmentation stores `_params` after a call and accepts `forward(x, params=...)`.
ColorJitter keeps its random order of the four adjustments in `_params` too,
so a replay reproduces it exactly (tests/test_survival.py checks this).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import kornia.augmentation as K
import numpy as np
import torch
from torch import Tensor, nn

from cba.augment import build_augment
from cba.errors import ConfigError
from cba.evaluate import to_float
from cba.triggers.base import Trigger

MEASURES = ("survival", "view_agreement", "batch_agreement", "energy")
ZERO_ENERGY = 1e-6


def _crop(size: int, min_scale: float) -> nn.Module:
    return K.RandomResizedCrop((size, size), scale=(min_scale, 1.0))


def _jitter(**factor: float) -> list[nn.Module]:
    return [K.ColorJitter(**factor, p=1.0)]


def _ctrl_official(size: int, min_scale: float) -> list[nn.Module]:
    """CTRL's own train_transform (loaders/diffaugment.py, kornia 0.6.5): crop, flip and
    grayscale per sample, jitter factors per sample, but jitter switched on or off once
    per batch (its RandomApply(ColorJitter, p=0.8) wraps the whole batch). CTRL crops at
    scale (0.2, 1); here `min_scale` is shared with the other columns."""
    jitter = K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=1.0)
    jitter.p_batch = 0.8  # kornia's batch-level gate, drawn from torch's generator
    return [_crop(size, min_scale), K.RandomHorizontalFlip(), jitter, K.RandomGrayscale(p=0.2)]


# name -> (image_size, min_scale) -> augmentation steps. Single components use p=1
# (in the pipeline flip has p=0.5, jitter 0.8, grayscale 0.2) so that their effect shows.
AUGMENTATIONS: dict[str, Callable[[int, float], list[nn.Module]]] = {
    "identity": lambda size, min_scale: [],
    "crop": lambda size, min_scale: [_crop(size, min_scale)],
    "flip": lambda size, min_scale: [K.RandomHorizontalFlip(p=1.0)],
    "brightness": lambda size, min_scale: _jitter(brightness=0.4),
    "contrast": lambda size, min_scale: _jitter(contrast=0.4),
    "saturation": lambda size, min_scale: _jitter(saturation=0.4),
    "hue": lambda size, min_scale: _jitter(hue=0.1),
    "grayscale": lambda size, min_scale: [K.RandomGrayscale(p=1.0)],
    "ssl": lambda size, min_scale: list(build_augment("ssl", size, False, min_scale)),
    "ssl_per_batch": lambda size, min_scale: list(build_augment("ssl", size, True, min_scale)),
    "ssl_ctrl": _ctrl_official,
}
DEFAULT_AUGMENTATIONS = tuple(name for name in AUGMENTATIONS if name != "identity")


def build_augmentation(name: str, image_size: int = 32, min_scale: float = 0.5) -> list[nn.Module]:
    """Fresh kornia steps of augmentation `name` (see AUGMENTATIONS)."""
    if name not in AUGMENTATIONS:
        raise ConfigError("augmentation", name, f"choose one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name](image_size, min_scale)


def paired_views(steps: Sequence[nn.Module], clean: Tensor, triggered: Tensor) -> tuple[Tensor, Tensor]:
    """One random draw of `steps` applied to both batches: drawn on `clean`, replayed on `triggered`."""
    for step in steps:
        clean = step(clean)
        triggered = step(triggered, params=step._params)
    return clean, triggered


def _spectrum(a: Tensor) -> Tensor:
    return torch.fft.rfft2(a.double())


def _correlate(spectrum_a: Tensor, spectrum_b: Tensor, size: tuple[int, int]) -> Tensor:
    # Summing over channels before the inverse transform: one inverse FFT per image, not three.
    return torch.fft.irfft2((spectrum_a * spectrum_b.conj()).sum(dim=1), s=size)


def shift_correlation(a: Tensor, b: Tensor) -> Tensor:
    """(N, H, W): entry s is <a, roll(b, s)> per image, summed over channels (circular)."""
    return _correlate(_spectrum(a), _spectrum(b), tuple(a.shape[-2:]))


def _energy(a: Tensor) -> Tensor:
    return a.double().pow(2).sum(dim=(1, 2, 3))


def _peak(spectrum_a: Tensor, spectrum_b: Tensor, size: tuple[int, int]) -> Tensor:
    return _correlate(spectrum_a, spectrum_b, size).flatten(1).amax(dim=1)


def _cosine(peak: Tensor, energy_a: Tensor, energy_b: Tensor, floor_a: Tensor, floor_b: Tensor) -> Tensor:
    """peak / (||a|| ||b||), 0 where an energy is at or below its floor (a zero residual)."""
    alive = (energy_a > floor_a) & (energy_b > floor_b)
    return torch.where(alive, peak / (energy_a * energy_b).clamp_min(1e-300).sqrt(), torch.zeros_like(peak))


def measure(steps: Sequence[nn.Module], clean: Tensor, triggered: Tensor, draws: int = 4,
            seed: int = 0) -> dict[str, Any]:
    """The MEASURES of one augmentation on float (N, C, H, W) pairs, plus `images` and `skipped`.

    Deterministic from `seed`: torch's generator, which kornia draws from, is seeded
    inside a forked state, so the caller's random stream is left untouched."""
    if draws < 1:
        raise ConfigError("draws", draws, "must be a positive integer")
    trigger = triggered - clean
    keep = _energy(trigger) > 0
    clean, triggered, trigger = clean[keep], triggered[keep], trigger[keep]
    counts = {"images": int(keep.sum()), "skipped": int((~keep).sum())}
    if not counts["images"]:
        return {**dict.fromkeys(MEASURES, math.nan), **counts}
    size = tuple(trigger.shape[-2:])
    trigger_energy, trigger_spectrum = _energy(trigger), _spectrum(trigger)
    floor = ZERO_ENERGY * trigger_energy
    values: dict[str, list[Tensor]] = {key: [] for key in MEASURES}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(draws):
            views = []
            for _ in range(2):
                view_clean, view_triggered = paired_views(steps, clean, triggered)
                residual = view_triggered - view_clean
                spectrum, energy = _spectrum(residual), _energy(residual)
                views.append((spectrum, energy))
                values["survival"].append(_peak(spectrum, trigger_spectrum, size) / trigger_energy)
                values["energy"].append(energy / trigger_energy)
                if len(residual) > 1:  # image i against image i+1 of the same draw
                    peak = _peak(spectrum, spectrum.roll(1, dims=0), size)
                    values["batch_agreement"].append(_cosine(peak, energy, energy.roll(1), floor, floor.roll(1)))
            (spectrum1, energy1), (spectrum2, energy2) = views
            values["view_agreement"].append(_cosine(_peak(spectrum1, spectrum2, size), energy1, energy2, floor, floor))
    means = {key: float(torch.cat(v).mean()) if v else math.nan for key, v in values.items()}
    return {**means, **counts}


def survival_table(trigger: Trigger, images: np.ndarray, min_scale: float, seed: int, draws: int = 4,
                   augmentations: Sequence[str] = DEFAULT_AUGMENTATIONS, label: str | None = None) -> list[dict[str, Any]]:
    """One row per augmentation: trigger (label), augmentation, the MEASURES, images, skipped.

    `images` is a uint8 (N, H, W, 3) batch; random placements (ssl_patch) come from `seed`."""
    triggered = trigger.apply(images, np.random.default_rng(seed))
    clean, poisoned = to_float(images), to_float(triggered)
    rows = []
    for name in augmentations:
        steps = build_augmentation(name, images.shape[1], min_scale)
        rows.append({"trigger": label or trigger.name, "augmentation": name,
                     **measure(steps, clean, poisoned, draws=draws, seed=seed)})
    return rows


# What a view keeps of the image's own content. Contrastive alignment ties a trigger to the target only
# through the poisons' views: when both views show the shape, the trigger merely co-occurs with it; when one
# view holds the trigger on little of the shape and the other the shape, aligning them asks the encoder to
# read the shape's features off the trigger (what noisy alignment builds on purpose). The crop is the only
# augmentation that removes content by geometry; flip keeps all of it, and jitter and grayscale change its
# colours, not its extent (a shape whose colours grayscale merges is not counted as lost here).


def crop_windows(size: int, min_scale: float, n: int) -> Tensor:
    """(n, 4) integer windows (top, bottom, left, right; ends exclusive) of n draws of the pipeline's crop,
    RandomResizedCrop at `min_scale`: kornia's own sampler, drawing from torch's generator."""
    # Only the sampler runs (the same draws as a forward pass); no image is warped.
    params = _crop(size, min_scale).forward_parameters(torch.Size([n, 1, size, size]))
    corners = params["src"].round().long()  # (n, 4, 2): (x, y) of top-left, top-right, bottom-right, bottom-left
    (left, top), (right, bottom) = corners[:, 0].T, corners[:, 2].T
    return torch.stack([top, bottom + 1, left, right + 1], dim=1)


def content_kept(masks: Tensor | np.ndarray, min_scale: float, draws: int = 4, seed: int = 0) -> Tensor:
    """(N, 2 * draws): the share of each image's content, the mass of its (N, H, W) mask in [0, 1], that lies
    inside a view's crop window; columns 2k and 2k + 1 are the two views of draw k. Deterministic from `seed`
    (forked torch generator, as `measure`); an image with an empty mask is refused."""
    if draws < 1:
        raise ConfigError("draws", draws, "must be a positive integer")
    masks = torch.as_tensor(np.asarray(masks), dtype=torch.float64)
    total = masks.sum(dim=(1, 2)) if masks.ndim == 3 else None
    if total is None or not bool((total > 0).all()):
        raise ConfigError("masks", tuple(masks.shape), "(N, H, W) masks, each with some content")
    n, size = len(masks), masks.shape[-1]
    # Summed-area table, zero-padded: the mass of any window is four lookups.
    table = torch.nn.functional.pad(masks.cumsum(1).cumsum(2), (1, 0, 1, 0))
    rows = torch.arange(n)
    kept = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(2 * draws):
            top, bottom, left, right = crop_windows(size, min_scale, n).T
            mass = (table[rows, bottom, right] - table[rows, top, right]
                    - table[rows, bottom, left] + table[rows, top, left])
            kept.append(mass / total)
    return torch.stack(kept, dim=1)


def content_summary(kept: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """`content_kept`'s table in three figures: the mean share kept; `views_below`, the share of views keeping
    less than `threshold` of the content; `split_pairs`, the share of two-view pairs in which exactly one view
    does (the trigger, in both views, is then aligned once with the content and once with little of it)."""
    below = kept < threshold
    return {"content_kept": float(kept.mean()), "views_below": float(below.float().mean()),
            "split_pairs": float((below[:, 0::2] ^ below[:, 1::2]).float().mean())}
