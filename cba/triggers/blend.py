"""Blend (Chen et al. 2017): a fixed full-image noise pattern mixed into every pixel."""

from __future__ import annotations

import numpy as np

from cba.errors import is_number
from cba.triggers.base import Trigger, map_in_chunks, to_uint8
from cba.triggers.registry import TRIGGERS


@TRIGGERS.register("blend")
class BlendTrigger(Trigger):
    """x' = (1 - alpha) * x + alpha * pattern, rounded to uint8.

    A small alpha keeps the trigger faint yet spread over the whole image, the
    opposite of a patch, so both ends of the locality spectrum are covered.
    """

    defaults = {"alpha": 0.1}

    def _validate(self) -> None:
        alpha = self.params["alpha"]
        if not is_number(alpha) or not 0 < alpha <= 1:
            self._fail("alpha", "must be in (0, 1]")
        self.params["alpha"] = float(alpha)

    def _build(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        size = self.image_size
        return {"pattern": rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)}

    def _apply(self, images: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        # Each output pixel depends only on (pixel, pattern pixel): a 256x256 lookup
        # table computed once in float64 gives the exact formula ~10x faster.
        alpha, levels = self.params["alpha"], np.arange(256.0)
        table = to_uint8((1 - alpha) * levels[:, None] + alpha * levels[None, :]).ravel()
        pattern = self._arrays["pattern"].astype(np.uint16)
        return map_in_chunks(lambda chunk: table[(chunk.astype(np.uint16) << 8) | pattern], images)
