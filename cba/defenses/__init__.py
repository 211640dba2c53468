"""Defense registry: one module per defense, one small interface (see base.py).

Each module registers itself when imported; importing them here is what makes
a defense available by name."""

from cba.defenses import (abl, activation_clustering, dbd, downstream_ft, fine_pruning, neural_cleanse,  # noqa: F401
                          scan, spectral, strip)
from cba.defenses.base import DEFENSES, KINDS, Defense, build_defense, detection_metrics, repair_metrics

__all__ = ["DEFENSES", "KINDS", "Defense", "build_defense", "detection_metrics", "repair_metrics"]
