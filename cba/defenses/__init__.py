"""Defense registry: one module per defense, one small interface (see base.py)."""

import importlib

from cba.defenses.base import (DEFENSES, KINDS, AttackRecord, Classifier, Defense, build_defense,
                               classifier_acc_asr, detection_metrics, repair_metrics)

# Each module registers itself; a module not yet written is skipped.
for _module in ("activation_clustering", "scan", "spectral", "abl", "fine_pruning", "neural_cleanse", "strip", "dbd",
                "downstream_ft"):
    try:
        importlib.import_module(f"cba.defenses.{_module}")
    except ModuleNotFoundError as exc:
        if exc.name != f"cba.defenses.{_module}":
            raise

__all__ = ["DEFENSES", "KINDS", "AttackRecord", "Classifier", "Defense", "build_defense", "classifier_acc_asr",
           "detection_metrics", "repair_metrics"]
