"""BadNets (Gu et al. 2017): a small fixed square stamped over every image."""

from __future__ import annotations

import numpy as np

from cba.errors import is_int
from cba.triggers.base import Trigger
from cba.triggers.registry import TRIGGERS

CORNERS = ("bottom_right", "top_left", "top_right", "bottom_left")
PATTERNS = ("checkerboard", "random", "white")


def square_pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) uint8 pattern; shared with other patch-like triggers."""
    if kind == "checkerboard":
        rows, cols = np.indices((size, size))
        cells = np.where((rows + cols) % 2 == 0, 255, 0).astype(np.uint8)
        return np.repeat(cells[:, :, None], 3, axis=2)
    if kind == "white":
        return np.full((size, size, 3), 255, dtype=np.uint8)
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


@TRIGGERS.register("patch")
class PatchTrigger(Trigger):
    """Pixels under the square are replaced; all others stay untouched."""

    defaults = {"size": 3, "location": "bottom_right", "pattern": "checkerboard"}

    def _validate(self) -> None:
        size = self._check_size()
        if self.params["pattern"] not in PATTERNS:
            self._fail("pattern", f"choose one of {', '.join(PATTERNS)}")
        self.corner = self._corner(size)

    def _corner(self, size: int) -> tuple[int, int]:
        """Top-left (row, col) of the square; [row, col] lists are taken as given."""
        location, last = self.params["location"], self.image_size - size
        if isinstance(location, str) and location in CORNERS:
            vertical, horizontal = location.split("_")
            return (last if vertical == "bottom" else 0, last if horizontal == "right" else 0)
        if isinstance(location, (list, tuple)) and len(location) == 2 and all(is_int(v) for v in location):
            row, col = (int(v) for v in location)
            if 0 <= row <= last and 0 <= col <= last:
                self.params["location"] = [row, col]  # JSON-friendly
                return row, col
        self._fail("location", f"choose one of {', '.join(CORNERS)}, or [row, col] "
                               f"with 0 <= row, col <= {last} (image size minus patch size)")

    def _build(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"pattern": square_pattern(self.params["pattern"], self.params["size"], rng)}

    def _apply(self, images: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        pattern = self._arrays["pattern"]
        row, col = self.corner
        out = images.copy()
        out[:, row:row + len(pattern), col:col + len(pattern)] = pattern
        return out
