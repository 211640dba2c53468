"""One small interface for every defense, and the metric schema of each kind.

An attack leaves one record (`cba.record.AttackRecord`) that every defense
reads, as in BackdoorBench; `cba.record.build_record` assembles it.

Kinds and the schema of what `Defense.run` returns:
- data_detection: flags suspicious training samples.
- input_detection: flags triggered test inputs.
  Both return `detection_metrics(...)`: auroc, tpr, fpr, precision, flagged.
- model_detection: flags the model and suspected target classes; returns
  anomaly_index (per class), flagged_classes, target_flagged.
- repair: returns a cleaned encoder or classifier; returns
  `repair_metrics(record.baseline, after)`: acc and asr before and after; every
  repair starts from the record's one baseline, the deployed classifier's.
A defense may add its own extra keys (curves, isolation precision, ...).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
# sklearn (and scipy) are imported where they are used: they take about 2 s to load, and every stage imports
# this package (stages.common) while most never run a defense.

from cba.errors import ConfigError
from cba.record import AttackRecord, Classifier, classifier_acc_asr, logits_of, predict  # noqa: F401  (the defenses' imports)

KINDS = ("data_detection", "input_detection", "model_detection", "repair")


class Defense:
    """Base class. Subclasses set `kind` and implement `run`; registering one names it.

    Constructor keyword arguments are the defense's parameters (from
    `defense.<name>` in params.yaml); `cba.defenses.registry.build_defense` checks them."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def run(self, record: AttackRecord, progress: bool = False) -> dict[str, Any]:
        raise NotImplementedError


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Parameter validation in one line, for defense constructors."""
    if not condition:
        raise ConfigError(key, value, allowed)


def roc_points(scores: np.ndarray, is_positive: np.ndarray, points: int = 51) -> dict[str, list[float]]:
    """The ROC curve on a fixed FPR grid (TPR interpolated), small enough to store and plot."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(is_positive, scores)
    grid = np.linspace(0.0, 1.0, points)
    return {"fpr": [float(x) for x in grid], "tpr": [float(y) for y in np.interp(grid, fpr, tpr)]}


def detection_metrics(scores: np.ndarray, is_positive: np.ndarray, flagged: np.ndarray) -> dict[str, Any]:
    """Higher score = more suspicious. `flagged` is the defense's own decision."""
    from sklearn.metrics import roc_auc_score

    scores, is_positive, flagged = (np.asarray(a) for a in (scores, is_positive, flagged))
    is_positive, flagged = is_positive.astype(bool), flagged.astype(bool)
    both = is_positive.any() and (~is_positive).any()
    tp = int((flagged & is_positive).sum())
    return {
        "auroc": float(roc_auc_score(is_positive, scores)) if both else float("nan"),
        "roc": roc_points(scores, is_positive) if both else {},
        "tpr": tp / max(int(is_positive.sum()), 1),
        "fpr": int((flagged & ~is_positive).sum()) / max(int((~is_positive).sum()), 1),
        "precision": tp / int(flagged.sum()) if flagged.any() else float("nan"),
        "flagged": int(flagged.sum()),
        "positives": int(is_positive.sum()),
        "total": int(len(is_positive)),
    }


def defense_effectiveness(before: dict[str, float], after: dict[str, float]) -> float:
    """BackdoorBench's DER: (max(0, ASR drop) - max(0, ACC drop) + 1) / 2, in [0, 1]; 0.5 means no effect."""
    return (max(0.0, before["asr"] - after["asr"]) - max(0.0, before["acc"] - after["acc"]) + 1.0) / 2.0


def repair_metrics(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """`before`/`after` hold acc and asr of the downstream classifier; `der` rates the repair (BackdoorBench)."""
    return {"acc_before": before["acc"], "asr_before": before["asr"], "acc_after": after["acc"], "asr_after": after["asr"],
            "der": defense_effectiveness(before, after)}
