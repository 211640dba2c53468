"""Choose the poisoned training indices and apply the trigger, from the seed.

Three threat models:
- clean_label: only target-class images carry the trigger and labels stay
  true. This is the SSL threat model (the attacker cannot touch labels, and
  pretraining ignores them anyway).
- dirty_label: images of other classes carry the trigger and are relabelled
  to the target (BadNets), for the supervised comparison.
- composite: noisy alignment (Chen et al., ICCV 2025). Each poisoned
  target-class image becomes a side-by-side composite of itself and a
  triggered image of another class, squeezed back to the image size. A crop
  that keeps mostly one half gives a view of the target object, another one a
  view of the trigger on unrelated content, and the contrastive loss pulls the
  two together. Labels stay true, as in clean_label.

`poison_rate` is a fraction of the whole training set in both modes, so the
two threat models spend the same budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cba.data.base import ImageSet
from cba.errors import ConfigError
from cba.triggers import Trigger
from cba.triggers.base import CHUNK

MODES = ("clean_label", "dirty_label", "composite")
# Modes whose poisons are target-class images (labels untouched).
TARGET_POOL_MODES = ("clean_label", "composite")


def validate_poison(labels: np.ndarray, num_classes: int, poison_rate: float, target_class: int, mode: str) -> int:
    """Check the poisoning parameters against the data; return the poison count."""
    if isinstance(poison_rate, bool) or not isinstance(poison_rate, (int, float)) or not 0 <= poison_rate <= 1:
        raise ConfigError("poison_rate", poison_rate, "a number in [0, 1]")
    if isinstance(target_class, bool) or not isinstance(target_class, int) or not 0 <= target_class < num_classes:
        raise ConfigError("target_class", target_class, f"an integer in [0, {num_classes - 1}]")
    if mode not in MODES:
        raise ConfigError("mode", mode, f"choose one of {', '.join(MODES)}")
    count = int(round(poison_rate * len(labels)))
    pool = int((labels == target_class).sum()) if mode in TARGET_POOL_MODES else int((labels != target_class).sum())
    if mode == "composite" and count and pool == len(labels):
        raise ConfigError("mode", mode, "needs images of at least one class besides the target to stamp the trigger on")
    if count > pool:
        where = "the target class" if mode in TARGET_POOL_MODES else "the non-target classes"
        raise ConfigError(
            "poison_rate", poison_rate,
            f"{mode} needs {count} images from {where}, which holds {pool}; use at most {pool / len(labels):.4f}",
        )
    return count


def choose_poison_indices(labels: np.ndarray, poison_rate: float, target_class: int, mode: str, seed: int) -> np.ndarray:
    """Sorted indices of the samples to poison, a deterministic function of `seed`."""
    labels = np.asarray(labels)
    count = validate_poison(labels, int(labels.max()) + 1 if len(labels) else 1, poison_rate, target_class, mode)
    pool = np.flatnonzero(labels == target_class) if mode in TARGET_POOL_MODES else np.flatnonzero(labels != target_class)
    rng = np.random.default_rng([seed, 0x9015])
    return np.sort(rng.choice(pool, size=count, replace=False))


@dataclass
class PoisonedSet:
    train: ImageSet  # images with triggers applied, labels as the victim sees them
    indices: np.ndarray  # sorted poisoned indices
    original_labels: np.ndarray
    # composite mode: the training image whose triggered copy shares each poison (aligned with `indices`)
    partners: np.ndarray | None = None

    def manifest(self) -> pd.DataFrame:
        poisoned = np.zeros(len(self.train), dtype=bool)
        poisoned[self.indices] = True
        frame = pd.DataFrame({
            "index": np.arange(len(self.train), dtype=np.int64),
            "label": self.train.labels,
            "original_label": self.original_labels,
            "poisoned": poisoned,
        })
        if self.partners is not None:  # composite mode: the image whose triggered copy fills the other half
            frame["partner"] = np.full(len(self.train), -1, dtype=np.int64)
            frame.loc[self.indices, "partner"] = self.partners
        return frame


def poison_dataset(data: ImageSet, trigger: Trigger, poison_rate: float, target_class: int, mode: str, seed: int) -> PoisonedSet:
    validate_poison(data.labels, data.num_classes, poison_rate, target_class, mode)
    indices = choose_poison_indices(data.labels, poison_rate, target_class, mode, seed)
    images, labels = data.images.copy(), data.labels.copy()
    partners = composite_partners(data.labels, indices, target_class, seed) if mode == "composite" else None
    if len(indices):
        # The trigger goes on the poisons themselves, or in composite mode on their partners.
        stamped = trigger.apply(images[indices if partners is None else partners], rng=np.random.default_rng([seed, 0x7A6]))
        if partners is None:
            images[indices] = stamped
            labels[indices] = target_class
        else:
            trigger_left = np.random.default_rng([seed, 0xC0B]).random(len(indices)) < 0.5
            images[indices] = side_by_side(images[indices], stamped, trigger_left)
    return PoisonedSet(ImageSet(images, labels, list(data.classes)), indices, data.labels.copy(), partners)


def composite_partners(labels: np.ndarray, indices: np.ndarray, target_class: int, seed: int) -> np.ndarray:
    """For each poison, a non-target training image (drawn with replacement) whose triggered copy joins it."""
    others = np.flatnonzero(np.asarray(labels) != target_class)
    return np.random.default_rng([seed, 0xA11]).choice(others, size=len(indices))


def side_by_side(target: np.ndarray, triggered: np.ndarray, trigger_left: np.ndarray) -> np.ndarray:
    """Join two uint8 NHWC batches left to right and squeeze each pair back to (H, W) (antialiased bilinear).

    `trigger_left[i]` puts the triggered image on the left of pair i."""
    left = np.where(trigger_left[:, None, None, None], triggered, target)
    right = np.where(trigger_left[:, None, None, None], target, triggered)
    out = np.empty_like(target)
    height, width = target.shape[1:3]
    for start in range(0, len(target), CHUNK):  # bounds the float temporaries, as the triggers do
        pair = torch.as_tensor(np.concatenate([left[start:start + CHUNK], right[start:start + CHUNK]], axis=2))
        squeezed = F.interpolate(pair.permute(0, 3, 1, 2).float(), size=(height, width), mode="bilinear",
                                 antialias=True, align_corners=False)
        out[start:start + CHUNK] = squeezed.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out


def triggered_test_set(test: ImageSet, trigger: Trigger, target_class: int, seed: int = 0) -> ImageSet:
    """The ASR set: every test image whose true class is not the target, with the trigger.

    Labels stay the true ones, so callers can also measure how often the
    prediction stays correct. The trigger is the one the attack stamps at test
    time (`Trigger.at_test_time`), which may differ from the poisons'."""
    keep = np.flatnonzero(test.labels != target_class)
    images = trigger.at_test_time().apply(test.images[keep], rng=np.random.default_rng([seed, 0x7E57]))
    return ImageSet(images, test.labels[keep], list(test.classes))
