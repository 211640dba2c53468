"""The data set registry and the one entry point the stages call."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np

from cba.data.base import ImageSet
from cba.errors import ConfigError, is_int
from cba.registry import Registry

Loader = Callable[..., ImageSet]
DATASETS: Registry[Loader] = Registry("name")

SPLITS = ("train", "test")


SUBSET_OPTIONS = ("train_size", "test_size")


def load_dataset(name: str, split: str, *, root: str | None = None, seed: int = 0, **options: Any) -> ImageSet:
    """Load `split` of data set `name`.

    Every data set takes `train_size` and `test_size`: generated sets make that
    many images, file-backed ones keep a random subset of that size (drawn from
    the seed), so a real data set fits a CPU budget."""
    loader = DATASETS.get(name, key="name")
    if split not in SPLITS:
        raise ConfigError("split", split, f"choose one of {', '.join(SPLITS)}")
    accepted = [p for p in inspect.signature(loader).parameters if p not in ("split", "root", "seed")]
    subset_sizes = {key: options.pop(key) for key in SUBSET_OPTIONS if key in options and key not in accepted}
    for key, value in options.items():
        if key not in accepted:
            allowed = sorted(set(accepted) | set(SUBSET_OPTIONS))
            raise ConfigError(f"{key}", value, f"{name} takes {', '.join(allowed)}")
    for key, value in subset_sizes.items():
        if value is not None and (not is_int(value) or value < 1):
            raise ConfigError(f"{key}", value, "an integer >= 1, or null for the whole split")
    data = loader(split, root=root, seed=seed, **options)
    size = subset_sizes.get(f"{split}_size")
    if size is None:
        return data
    if size > len(data):
        raise ConfigError(f"{split}_size", size, f"at most {len(data)}, the size of {name}'s {split} split")
    rng = np.random.default_rng([seed, 0x5B5E7, SPLITS.index(split)])
    return data.subset(np.sort(rng.permutation(len(data))[:size]))
