"""A test-time pattern fitted after the poisons: read as the target by the poisoned surrogate, not by clean encoders.

The poisons teach a victim to push a kind of pattern towards the target, and a clean encoder already pulls
some patterns of that kind there (docs/results/pull-and-push.md). The 3x rule compares the victim with one
that saw no poisons, read with the same trigger, so what counts is the push alone. The attacker controls the
test inputs, and after fitting the poison pattern it holds a surrogate that learned from those poisons and a
copy that never saw one. So it can look, within the same L-inf budget, for the test-time pattern that the
poisoned surrogate reads as the target and clean encoders do not: starting from the poison pattern, signed
steps on

    mean_j CE(h_j(f_p(x + delta)), target) + weight * mean_k P_k(target | x + delta)

where f_p is the poisoned surrogate, h_j its heads (a probe, as the victim's linear probe reads, and, if
asked, nearest centroids, as kNN reads), and P_k the target probability under the k-th clean reader (the
never-poisoned copy, and any other clean encoders the attacker trains). The test set shows images
unaugmented, so no augmentation is drawn here.

`trigger.params.test_weight` > 0 makes the trigger stage fit this pattern right after the poison pattern
(`fit_test_pattern`), and every test-time stamp uses it (`Trigger.at_test_time`); the poisons keep theirs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cba.progress import tqdm
from cba.triggers.optimize import probe_hit_rate, target_head
from cba.triggers.perturbation import stamp

Reader = tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]  # an encoder and a head: logits, target = 0
HEAD_SEED = 11  # the surrogate's heads draw from seed + HEAD_SEED + k, apart from the trigger fit's own (+ 0..3)
CLEAN_COPY_HEAD = -2  # k of the clean copy's head where the test-time fit builds it (true labels)


def _logits(reader: Reader, x: torch.Tensor) -> torch.Tensor:
    encoder, head = reader
    return head(encoder(x.contiguous(memory_format=torch.channels_last)).float())


def diverse_input(x: torch.Tensor, gen: torch.Generator, grow: int = 4) -> torch.Tensor:
    """One random rescale-and-shift of a batch (input diversity, Xie et al. CVPR 2019), back to its size:
    nearest-resized to a side in [H, H + grow), placed at a random spot of an (H + grow) black canvas, and
    resized to H bilinearly; differentiable in `x`."""
    size = x.shape[-1]
    side = size + int(torch.randint(grow, (1,), generator=gen))
    top, left = (int(v) for v in torch.randint(size + grow - side + 1, (2,), generator=gen))
    canvas = F.pad(F.interpolate(x, size=(side, side), mode="nearest"),
                   (left, size + grow - side - left, top, size + grow - side - top))
    return F.interpolate(canvas, size=(size, size), mode="bilinear", align_corners=False)


def fit_activation_pattern(start: np.ndarray, poisoned: list[Reader], clean: list[Reader], images: torch.Tensor,
                           linf: float, weight: float, steps: int, step_size: float, seed: int,
                           batch_size: int = 128, progress: bool = False, diversity: float = 0.0) -> np.ndarray:
    """The test-time pattern, (H, W, 3) on the 0-255 scale within +-`linf`, from `start` (the same layout).

    `poisoned`: the readers that should send triggered images to the target (the poisoned surrogate through
    each of its heads); `images`: float (N, 3, H, W) in [0, 1], the attacker's non-target images (the ones
    ASR counts); `step_size`: each signed step as a fraction of the budget; the batches are drawn from `seed`.
    `diversity`: the probability that a step reads its batch through `diverse_input` (drawn from its own
    stream, so 0 gives the plain fit), the transfer-attack remedy for a pattern that suits only the models it
    was fitted on."""
    if not poisoned:
        raise ValueError("at least one poisoned reader is needed")
    if not clean and weight > 0:
        raise ValueError("a weight on the clean readers needs at least one clean reader")
    eps = linf / 255.0
    delta = torch.as_tensor(np.clip(start, -linf, linf) / 255.0, dtype=torch.float32).permute(2, 0, 1)[None]
    delta = delta.to(images.device).requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    views = torch.Generator().manual_seed(seed + 1)
    for _ in tqdm(range(steps), desc="test-time pattern", unit="step", disable=not progress, mininterval=1.0):
        x = stamp(images[torch.randint(len(images), (batch_size,), generator=gen)], delta)
        if diversity > 0 and float(torch.rand((), generator=views)) < diversity:
            x = diverse_input(x, views)
        goal = torch.zeros(len(x), dtype=torch.long, device=x.device)
        loss = torch.stack([F.cross_entropy(_logits(r, x), goal) for r in poisoned]).mean()
        if weight > 0:
            loss = loss + weight * torch.stack([_logits(r, x).softmax(1)[:, 0].mean() for r in clean]).mean()
        grad, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta -= step_size * eps * grad.sign()
            delta.clamp_(-eps, eps)
    values = delta.detach()[0].permute(1, 2, 0).cpu().numpy() * 255.0
    return np.clip(values, -linf, linf).astype(np.float32)


def hit_rate(reader: Reader, images: torch.Tensor, pattern: np.ndarray) -> float:
    """The share of `images` (float NCHW in [0, 1]) that `reader` sends to the target with `pattern` added."""
    delta = torch.as_tensor(pattern / 255.0, dtype=torch.float32).permute(2, 0, 1)[None].to(images.device)
    return probe_hit_rate(*reader, images, lambda _part: delta)


def surrogate_reader(encoder: nn.Module, data: torch.Tensor, target_mask: np.ndarray, clusters: int, seed: int,
                     k: int = 0, kind: str = "probe", labels: torch.Tensor | None = None) -> Reader:
    """`encoder` read through a head fitted on the attacker's pseudo-labels, or on `labels` where it holds them
    (`cba.triggers.optimize.target_head`), its own generator drawn from `seed` and `k`, so one head is the same
    whichever others are built."""
    gen = torch.Generator().manual_seed(seed + HEAD_SEED + k)
    return encoder, target_head(encoder, data, target_mask, clusters, kind, gen, labels=labels)


def target_first(labels: np.ndarray, target: int) -> np.ndarray:
    """Class labels as the heads take them: the target's 0, the other classes 1, 2, ... in their order."""
    labels = np.asarray(labels)
    return np.where(labels == target, 0, labels + (labels < target))


def attacker_readers(keep: dict, target_mask: np.ndarray, clusters: int, seed: int,
                     labels: torch.Tensor | None = None) -> tuple[Reader, Reader]:
    """The poisoned surrogate (the first, with an ensemble) and the never-poisoned copy, each read through a
    probe: on `labels` (`target_first`) where the attacker holds them, else on its pseudo-labels (the copy's
    probe is then the trigger fit's own)."""
    data = keep["data"]
    surrogate = surrogate_reader(keep["poisoned"][0].requires_grad_(False), data, target_mask, clusters, seed,
                                 labels=labels)
    clean = ((keep["clean"], keep["clean_probe"]) if labels is None
             else surrogate_reader(keep["clean"], data, target_mask, clusters, seed, CLEAN_COPY_HEAD, labels=labels))
    return surrogate, clean


def fit_test_pattern(pattern: np.ndarray, keep: dict, target_mask: np.ndarray, clusters: int, linf: float,
                     weight: float, steps: int, step_size: float, seed: int, progress: bool = False,
                     labels: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """The trigger fit's test-time pattern and its figures on the attacker's own models.

    `keep`: the attacker's models as `optimize_trigger` leaves them; the poisoned surrogate should send
    triggered non-target images to the target, the never-poisoned copy should not (`attacker_readers`).
    Figures: the share of the attacker's non-target images each model's probe sends to the target with the
    poison pattern (`poison_*`) and with the test-time one (`test_*`)."""
    data = keep["data"]
    surrogate, clean = attacker_readers(keep, target_mask, clusters, seed,
                                        None if labels is None else torch.as_tensor(labels))
    pool = data[torch.as_tensor(np.flatnonzero(~np.asarray(target_mask, dtype=bool)))]
    fitted = fit_activation_pattern(pattern, [surrogate], [clean], pool, linf, weight, steps, step_size, seed,
                                    progress=progress)
    figures = {"poison_surrogate_probe_hit_rate": hit_rate(surrogate, pool, pattern),
               "poison_clean_copy_probe_hit_rate": hit_rate(clean, pool, pattern),
               "test_surrogate_probe_hit_rate": hit_rate(surrogate, pool, fitted),
               "test_clean_copy_probe_hit_rate": hit_rate(clean, pool, fitted)}
    return fitted, figures
