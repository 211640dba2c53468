"""The trigger interface, and saving/loading a trigger as a stage artifact.

A trigger is built from (name, params, seed, image_size). Its concrete data
(patterns, spectra) lives in `tensors()`; those tensors are what the trigger
stage writes, and on load they replace whatever the seed would rebuild, so a
hand-edited or optimised pattern survives a round trip.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from cba.errors import ConfigError, is_int

TENSORS_FILE = "trigger.safetensors"
JSON_FILE = "trigger.json"
# Bounds float temporaries to ~50 MB whatever the batch size.
CHUNK = 2048


class Trigger(ABC):
    """Stamps a backdoor trigger onto uint8 (N, H, W, 3) images.

    Subclasses are registered with `@TRIGGERS.register(name)`, which sets `name`.
    They set `defaults` (every parameter they accept, with its
    default), check `self.params` in `_validate`, build their arrays from the
    seeded generator in `_build`, and implement `_apply`.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    # True for triggers whose pattern is learned: the trigger stage calls `fit(images, target_mask)`.
    learns_from_data: ClassVar[bool] = False

    def __init__(self, *, seed: int, image_size: int = 32, **params: Any):
        self.check_param_names(params)
        if not is_int(seed) or seed < 0:
            raise ConfigError("seed", seed, "must be a non-negative integer")
        if not is_int(image_size) or image_size < 1:
            raise ConfigError("image_size", image_size, "must be a positive integer")
        self.seed, self.image_size = int(seed), int(image_size)
        self.params: dict[str, Any] = {**copy.deepcopy(self.defaults), **copy.deepcopy(params)}
        self._validate()
        self._arrays: dict[str, np.ndarray] = self._build(np.random.default_rng(self.seed))

    @classmethod
    def check_param_names(cls, params: dict[str, Any]) -> None:
        unknown = sorted(set(params) - set(cls.defaults))
        if unknown:
            allowed = ", ".join(sorted(cls.defaults)) or "none"
            raise ConfigError(unknown[0], params[unknown[0]],
                              f"not a parameter of trigger '{cls.name}'; allowed: {allowed}")

    # --- subclass hooks -------------------------------------------------
    def _validate(self) -> None:
        """Raise ConfigError for bad params; may normalise them (tuples -> lists)."""

    @abstractmethod
    def _build(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The trigger's concrete data, drawn from the seeded generator."""

    @abstractmethod
    def _apply(self, images: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """Return a new triggered uint8 batch; `images` is already checked."""

    # --- public API -----------------------------------------------------
    def apply(self, images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Triggered copy of a uint8 NHWC batch; the input is never modified.

        `rng` only matters for triggers with random placement (ssl_patch).
        """
        return self._apply(self._check_images(images), rng)

    def at_test_time(self) -> "Trigger":
        """The trigger stamped on test inputs: this one, unless the attack fitted another for test time."""
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        return {key: torch.from_numpy(array.copy()) for key, array in self._arrays.items()}

    def set_tensors(self, tensors: dict[str, torch.Tensor], source: str = "tensors") -> None:
        """Replace the trigger's data with saved tensors of the same keys, shapes and dtypes."""
        if set(tensors) != set(self._arrays):
            raise ConfigError("path", source, f"holds tensors {sorted(tensors)}, trigger '{self.name}' "
                              f"expects {sorted(self._arrays)}")
        loaded = {}
        for key, expected in self._arrays.items():
            array = tensors[key].detach().cpu().numpy()
            if array.shape != expected.shape or array.dtype != expected.dtype:
                raise ConfigError("path", source, f"tensor '{key}' is {array.dtype} {array.shape}, "
                                  f"expected {expected.dtype} {expected.shape} for these params")
            loaded[key] = array.copy()
        self._arrays = loaded

    def config(self) -> dict[str, Any]:
        """Everything besides the tensors needed to rebuild this trigger."""
        return {"name": self.name, "params": copy.deepcopy(self.params),
                "seed": self.seed, "image_size": self.image_size}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args}, seed={self.seed}, image_size={self.image_size})"

    # --- helpers for subclasses ------------------------------------------
    def _fail(self, param: str, allowed: str) -> None:
        raise ConfigError(param, self.params[param], allowed)

    def _check_size(self, param: str = "size") -> int:
        """A square side length that fits inside the image."""
        size = self.params[param]
        if not is_int(size) or not 1 <= size <= self.image_size:
            self._fail(param, f"must be an integer in [1, {self.image_size}] (the image size)")
        return int(size)

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
            raise TypeError(f"trigger images must be a uint8 (N, H, W, 3) array, got {got}")
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ConfigError("image_size", self.image_size,
                              f"must match the images, which are {images.shape[1]}x{images.shape[2]}")
        return images


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Round to nearest and clip into the valid pixel range."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def map_in_chunks(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """Apply a float-heavy uint8 -> uint8 function chunk by chunk to bound memory."""
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        out[start:start + CHUNK] = fn(images[start:start + CHUNK])
    return out
