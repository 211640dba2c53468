"""One small interface for every defense, and the metric schema of each kind.

An attack leaves one record (`AttackRecord`) that every defense reads, as in
BackdoorBench; in the pipeline it is assembled from the DVC artifacts.

Kinds and the schema of what `Defense.run` returns:
- data_detection: flags suspicious training samples.
- input_detection: flags triggered test inputs.
  Both return `detection_metrics(...)`: auroc, tpr, fpr, precision, flagged.
- model_detection: flags the model and suspected target classes; returns
  anomaly_index (per class), flagged_classes, target_flagged.
- repair: returns a cleaned encoder or classifier; returns
  `repair_metrics(before, after)`: acc and asr before and after.
A defense may add its own extra keys (curves, isolation precision, ...).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from cba.data.base import ImageSet
from cba.errors import ConfigError, is_int, is_number
from cba.registry import Registry
from cba.triggers import Trigger

KINDS = ("data_detection", "input_detection", "model_detection", "repair")


class Classifier(nn.Module):
    """The downstream classifier: encoder + head, on [0, 1] images (N, 3, H, W).

    For SSL attacks the head is the linear probe fitted on clean labels; for
    the supervised attack it is the model's own (poisoned) head."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


@dataclass
class AttackRecord:
    """Everything an attack leaves behind for the defenses to inspect."""

    encoder: nn.Module  # pretrained on the poisoned set
    classifier: Classifier  # encoder + downstream head
    train: ImageSet  # the poisoned training set, labels as the victim saw them
    clean_train: ImageSet  # the same images without triggers, true labels (the defender never sees this for data detection)
    test: ImageSet  # clean test set
    triggered: ImageSet  # triggered test images whose true class is not the target
    poisoned: np.ndarray  # bool mask over `train`: ground truth, for scoring only
    target_class: int
    trigger: Trigger
    method: str  # simclr, byol, ..., supervised
    losses: pd.DataFrame | None = None  # per-sample loss log: epoch, index, poisoned, loss
    model_state: dict[str, torch.Tensor] | None = None  # the full method state (heads, EMA), for defenses that retrain
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.test.num_classes


class Defense:
    """Base class. Subclasses set `name`, `kind` and implement `run`.

    Constructor keyword arguments are the defense's parameters (from
    `defense.<name>` in params.yaml); `build_defense` validates their names."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def run(self, record: AttackRecord, progress: bool = False) -> dict[str, Any]:
        raise NotImplementedError


DEFENSES: Registry[type[Defense]] = Registry("defenses")


# What each annotation of a defense option accepts, checked before the constructor sees the value.
_OPTION_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (is_int, "an integer"),
    "float": (is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "float | str": (lambda v: is_number(v) or isinstance(v, str), "a number or a word"),
    "bool | str": (lambda v: isinstance(v, (bool, str)), "true, false or a word"),
    "list[float]": (lambda v: isinstance(v, list) and all(is_number(x) for x in v), "a list of numbers"),
}


def build_defense(name: str, **params: Any) -> Defense:
    cls = DEFENSES.get(name, key="defense")
    signature = {p.name: p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"}
    for key, value in params.items():
        if key not in signature:
            raise ConfigError(f"defense.{name}.{key}", value, f"{name} takes {', '.join(signature) or 'no options'}")
        accepts, allowed = _OPTION_TYPES.get(str(signature[key].annotation), (lambda v: True, ""))
        if not accepts(value):  # a wrong type would otherwise reach the constructor's comparisons as a traceback
            raise ConfigError(f"defense.{name}.{key}", value, allowed)
    return cls(**params)


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Parameter validation in one line, for defense constructors."""
    if not condition:
        raise ConfigError(key, value, allowed)


def roc_points(scores: np.ndarray, is_positive: np.ndarray, points: int = 51) -> dict[str, list[float]]:
    """The ROC curve on a fixed FPR grid (TPR interpolated), small enough to store and plot."""
    fpr, tpr, _ = roc_curve(is_positive, scores)
    grid = np.linspace(0.0, 1.0, points)
    return {"fpr": [float(x) for x in grid], "tpr": [float(y) for y in np.interp(grid, fpr, tpr)]}


def detection_metrics(scores: np.ndarray, is_positive: np.ndarray, flagged: np.ndarray) -> dict[str, Any]:
    """Higher score = more suspicious. `flagged` is the defense's own decision."""
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


@torch.no_grad()
def predict(model: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    """Class predictions of uint8 images, in eval mode."""
    return logits_of(model, images, batch_size).argmax(1)


@torch.no_grad()
def logits_of(model: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    from cba.evaluate import to_float

    if isinstance(model, nn.Module):
        model.eval()
    outs = [model(to_float(images[i : i + batch_size])).float() for i in range(0, len(images), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def classifier_acc_asr(model: Callable[[torch.Tensor], torch.Tensor], record_or_test: "AttackRecord | ImageSet",
                       triggered: ImageSet | None = None, target_class: int | None = None) -> dict[str, float]:
    """ACC on the clean test set and ASR on the triggered non-target test images.

    Pass an AttackRecord, or the test set, the triggered set and the target class."""
    from cba.evaluate import accuracy, attack_success_rate

    if isinstance(record_or_test, AttackRecord):
        test, triggered, target_class = record_or_test.test, record_or_test.triggered, record_or_test.target_class
    else:
        test = record_or_test
    assert triggered is not None and target_class is not None
    return {
        "acc": accuracy(predict(model, test.images), test.labels),
        "asr": attack_success_rate(predict(model, triggered.images), target_class),
    }
