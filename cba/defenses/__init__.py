"""Defense registry: one module per defense, one small interface (see base.py)."""

import importlib

from cba.defenses.base import (DEFENSES, KINDS, AttackRecord, Classifier, Defense, build_defense,
                               classifier_acc_asr, detection_metrics, repair_metrics)

# Each module registers itself on import.
for _module in ("activation_clustering", "scan", "spectral", "abl", "fine_pruning", "neural_cleanse", "strip", "dbd",
                "downstream_ft"):
    importlib.import_module(f"cba.defenses.{_module}")

__all__ = ["DEFENSES", "KINDS", "AttackRecord", "Classifier", "Defense", "build_defense", "classifier_acc_asr",
           "detection_metrics", "repair_metrics"]
