"""The data set registry and the one entry point the stages call."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from cba.data.base import ImageSet
from cba.errors import ConfigError
from cba.registry import Registry

Loader = Callable[..., ImageSet]
DATASETS: Registry[Loader] = Registry("data.name")

SPLITS = ("train", "test")


def load_dataset(name: str, split: str, *, root: str | None = None, seed: int = 0, **options: Any) -> ImageSet:
    loader = DATASETS.get(name, key="data.name")
    if split not in SPLITS:
        raise ConfigError("split", split, f"choose one of {', '.join(SPLITS)}")
    accepted = [p for p in inspect.signature(loader).parameters if p not in ("split", "root", "seed")]
    for key, value in options.items():
        if key not in accepted:
            raise ConfigError(f"data.options.{key}", value, f"{name} takes {', '.join(accepted) or 'no options'}")
    return loader(split, root=root, seed=seed, **options)


def _register_builtin() -> None:
    # Imported for their registration side effect.
    import importlib

    for module in ("synthetic", "synthetic_alt", "cifar", "idx", "imagefolder"):
        importlib.import_module(f"cba.data.{module}")


_register_builtin()
