"""SSL-Backdoor (Saha et al. CVPR 2022): a coloured patch pasted at a random spot.

The random placement is the point: random crops in contrastive augmentation
would cut away a patch that always sat in one corner.
"""

from __future__ import annotations

import numpy as np

from cba.triggers.base import Trigger
from cba.triggers.patch import square_pattern
from cba.triggers.registry import TRIGGERS

# Placement gets its own stream so it does not replay the pattern's draws.
PLACEMENT_STREAM = 1


@TRIGGERS.register("ssl_patch")
class SSLPatchTrigger(Trigger):
    defaults = {"size": 8}

    def _validate(self) -> None:
        self._check_size()

    def _build(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"pattern": square_pattern("random", self.params["size"], rng)}

    def locations(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """(n, 2) top-left corners, uniform over all positions where the patch fits.

        Without `rng`, a generator seeded by the trigger seed: the same batch
        length always gets the same placements.
        """
        if rng is None:
            rng = np.random.default_rng([self.seed, PLACEMENT_STREAM])
        return rng.integers(0, self.image_size - self.params["size"] + 1, size=(n, 2))

    def _apply(self, images: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        pattern = self._arrays["pattern"]
        corners = self.locations(len(images), rng)
        offsets = np.arange(len(pattern))
        rows = corners[:, 0, None] + offsets  # (n, size)
        cols = corners[:, 1, None] + offsets
        out = images.copy()
        out[np.arange(len(images))[:, None, None], rows[:, :, None], cols[:, None, :]] = pattern
        return out
