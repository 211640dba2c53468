"""Fit a learned trigger on the attacker's share of the training data; a no-op for fixed triggers.

The stage, the in-process attack runner and the bench scripts all call this,
so a learned trigger sees the same attacker data wherever it is fitted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cba.errors import ConfigError
from cba.triggers.base import Trigger


def attacker_pool(n_images: int, size: int | str, seed: int) -> np.ndarray:
    """The attacker's own images: a seeded random subset of the training split, sorted (`all`: every one)."""
    size = n_images if size == "all" else int(size)
    if size > n_images:
        raise ConfigError("surrogate_size", size, f"at most {n_images}, the training-set size")
    return np.sort(np.random.default_rng([seed, 0xA77AC]).permutation(n_images)[:size])


def fit_trigger(trigger: Trigger, images: np.ndarray, labels: np.ndarray, target_class: int, seed: int,
                device: torch.device | None = None, progress: bool = True,
                keep: dict | None = None) -> dict[str, Any] | None:
    """Fit `trigger` in place if it learns from data; return its figures (None for a fixed trigger).

    The attacker holds `surrogate_size` unlabelled training images and knows
    which of them are target-class images (the ones a clean-label attacker
    poisons); their classes go along, for the options that give the attacker them. A `keep` dict receives
    the attacker's models after the fit (`optimize_trigger`), `target_mask`, which of `data` are target-class
    images, and `labels`, their classes (in the training set's numbering)."""
    if not trigger.learns_from_data:
        return None
    labels = np.asarray(labels)
    if not (labels == target_class).any():
        raise ConfigError("target_class", target_class, "a class present in the training data")
    pool = attacker_pool(len(labels), trigger.params["surrogate_size"], seed)
    if not (labels[pool] == target_class).any():
        raise ConfigError("surrogate_size", trigger.params["surrogate_size"],
                          f"large enough to hold target-class images (class {target_class})")
    # The trigger reads its images' classes only where its options give the attacker them (fit_labels, test_labels).
    target_mask = labels[pool] == target_class
    if keep is not None:
        keep.update(target_mask=target_mask, labels=labels[pool])
    return trigger.fit(images[pool], target_mask, device=device, progress=progress, keep=keep, labels=labels[pool])
