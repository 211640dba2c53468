"""Choose the poisoned training indices and apply the trigger, from the seed.

Two threat models:
- clean_label: only target-class images carry the trigger and labels stay
  true. This is the SSL threat model (the attacker cannot touch labels, and
  pretraining ignores them anyway).
- dirty_label: images of other classes carry the trigger and are relabelled
  to the target (BadNets), for the supervised comparison.

`poison_rate` is a fraction of the whole training set in both modes, so the
two threat models spend the same budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cba.data.base import ImageSet
from cba.errors import ConfigError
from cba.triggers import Trigger

MODES = ("clean_label", "dirty_label")


def validate_poison(labels: np.ndarray, num_classes: int, poison_rate: float, target_class: int, mode: str) -> int:
    """Check the poisoning parameters against the data; return the poison count."""
    if isinstance(poison_rate, bool) or not isinstance(poison_rate, (int, float)) or not 0 <= poison_rate <= 1:
        raise ConfigError("poison_rate", poison_rate, "a number in [0, 1]")
    if isinstance(target_class, bool) or not isinstance(target_class, int) or not 0 <= target_class < num_classes:
        raise ConfigError("target_class", target_class, f"an integer in [0, {num_classes - 1}]")
    if mode not in MODES:
        raise ConfigError("mode", mode, f"choose one of {', '.join(MODES)}")
    count = int(round(poison_rate * len(labels)))
    pool = int((labels == target_class).sum()) if mode == "clean_label" else int((labels != target_class).sum())
    if count > pool:
        where = "the target class" if mode == "clean_label" else "the non-target classes"
        raise ConfigError(
            "poison_rate", poison_rate,
            f"{mode} needs {count} images from {where}, which holds {pool}; use at most {pool / len(labels):.4f}",
        )
    return count


def choose_poison_indices(labels: np.ndarray, poison_rate: float, target_class: int, mode: str, seed: int) -> np.ndarray:
    """Sorted indices of the samples to poison, a deterministic function of `seed`."""
    labels = np.asarray(labels)
    count = validate_poison(labels, int(labels.max()) + 1 if len(labels) else 1, poison_rate, target_class, mode)
    pool = np.flatnonzero(labels == target_class) if mode == "clean_label" else np.flatnonzero(labels != target_class)
    rng = np.random.default_rng([seed, 0x9015])
    return np.sort(rng.choice(pool, size=count, replace=False))


@dataclass
class PoisonedSet:
    train: ImageSet  # images with triggers applied, labels as the victim sees them
    indices: np.ndarray  # sorted poisoned indices
    original_labels: np.ndarray

    def manifest(self) -> pd.DataFrame:
        poisoned = np.zeros(len(self.train), dtype=bool)
        poisoned[self.indices] = True
        return pd.DataFrame({
            "index": np.arange(len(self.train), dtype=np.int64),
            "label": self.train.labels,
            "original_label": self.original_labels,
            "poisoned": poisoned,
        })


def poison_dataset(data: ImageSet, trigger: Trigger, poison_rate: float, target_class: int, mode: str, seed: int) -> PoisonedSet:
    validate_poison(data.labels, data.num_classes, poison_rate, target_class, mode)
    indices = choose_poison_indices(data.labels, poison_rate, target_class, mode, seed)
    images, labels = data.images.copy(), data.labels.copy()
    if len(indices):
        images[indices] = trigger.apply(images[indices], rng=np.random.default_rng([seed, 0x7A6]))
        labels[indices] = target_class
    return PoisonedSet(ImageSet(images, labels, list(data.classes)), indices, data.labels.copy())


def triggered_test_set(test: ImageSet, trigger: Trigger, target_class: int, seed: int = 0) -> ImageSet:
    """The ASR set: every test image whose true class is not the target, with the trigger.

    Labels stay the true ones, so callers can also measure how often the
    prediction stays correct."""
    keep = np.flatnonzero(test.labels != target_class)
    images = trigger.apply(test.images[keep], rng=np.random.default_rng([seed, 0x7E57]))
    return ImageSet(images, test.labels[keep], list(test.classes))
