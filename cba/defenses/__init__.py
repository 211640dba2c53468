"""Defenses: one module per defense, one small interface (base.py), one registry (registry.py).

Each module registers itself when imported; importing them here is what makes
a defense available by name."""

from cba.defenses import (abl, activation_clustering, dbd, downstream_ft, fine_pruning, neural_cleanse,  # noqa: F401
                          scan, spectral, strip)
from cba.defenses.base import KINDS, Defense, detection_metrics, repair_metrics
from cba.defenses.registry import DEFENSES, build_defense

__all__ = ["DEFENSES", "KINDS", "Defense", "build_defense", "detection_metrics", "repair_metrics"]
