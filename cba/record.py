"""The one record an attack leaves for the defenses, and the one place it is built.

`build_record` assembles it both for the pipeline (from the DVC artifacts, in
`cba defend`) and in memory (`cba.attack.run_attack`, for tests and benches),
so a bench figure and a pipeline figure come from the same code. The record
carries the trained method object itself (encoder, heads, momentum state):
defenses that retrain it copy it rather than rebuild it from tensor shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from cba.data.base import ImageSet
from cba.evaluate import accuracy, attack_success_rate, extract_features, fit_linear_probe, to_float
from cba.poison import triggered_test_set
from cba.probe import LinearProbe
from cba.triggers import Trigger


class Classifier(nn.Module):
    """The downstream classifier: encoder + head, on [0, 1] images (N, 3, H, W).

    For SSL attacks the head is the linear probe fitted on clean labels; for
    the supervised attack it is the model's own (poisoned) head."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


@torch.no_grad()
def logits_of(model: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    if isinstance(model, nn.Module):
        model.eval()
    outs = [model(to_float(images[i : i + batch_size])).float() for i in range(0, len(images), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def predict(model: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    """Class predictions of uint8 images, in eval mode."""
    return logits_of(model, images, batch_size).argmax(1)


def own_head(method: nn.Module) -> nn.Module | None:
    """The head a method learned from labels (the supervised attack's), or None for an SSL method."""
    return method.head if getattr(method, "uses_labels", False) and hasattr(method, "head") else None


def downstream_classifier(method: nn.Module, clean: ImageSet, seed: int = 0, probe: LinearProbe | None = None,
                          **probe_options: Any) -> Classifier:
    """The classifier a victim deploys: the supervised method's own head; for an SSL encoder, the
    converged linear probe on clean labels (`probe` when `cba finetune` already fitted it)."""
    encoder = method.encoder.eval()
    head = own_head(method)
    if head is None:
        head = probe
    if head is None:
        features = extract_features(encoder, clean.images)
        head = fit_linear_probe(features, torch.as_tensor(clean.labels), clean.num_classes, seed=seed, **probe_options).probe
    return Classifier(encoder, head.eval()).eval()


@dataclass
class AttackRecord:
    """Everything an attack leaves behind for the defenses to inspect."""

    model: nn.Module  # the trained method (an SSLMethod): encoder, heads, momentum state
    classifier: Classifier  # encoder + downstream head
    train: ImageSet  # the poisoned training set, labels as the victim saw them
    clean_train: ImageSet  # the same images without triggers, true labels (the defender never sees this for data detection)
    test: ImageSet  # clean test set
    triggered: ImageSet  # triggered test images whose true class is not the target
    poisoned: np.ndarray  # bool mask over `train`: ground truth, for scoring only
    target_class: int
    trigger: Trigger
    method: str  # the method's registry name: simclr, byol, ..., supervised
    backbone: str
    width: int
    hparams: dict[str, Any]  # the method's own options, as it was built
    baseline: dict[str, float]  # ACC and ASR of `classifier` before any repair: every repair defense starts from it
    losses: pd.DataFrame | None = None  # per-sample loss log: epoch, index, poisoned, loss
    seed: int = 0
    curves: list[dict[str, float]] = field(default_factory=list)  # kNN ACC/ASR during pretraining
    train_seconds: float | None = None

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    @property
    def num_classes(self) -> int:
        return self.test.num_classes

    @property
    def final_loss(self) -> float:
        """The training loss of the last epoch (NaN if unknown).

        Training stops on a non-finite loss, but a bench that reports an ASR
        should still show this: a collapsed victim's ASR means nothing."""
        if self.losses is not None and len(self.losses):  # the mean over samples, not over batches
            last = self.losses["epoch"] == self.losses["epoch"].max()
            return float(self.losses.loc[last, "loss"].mean())
        if self.curves and "loss" in self.curves[-1]:
            return float(self.curves[-1]["loss"])
        return float("nan")


def classifier_acc_asr(model: Callable[[torch.Tensor], torch.Tensor], record_or_test: AttackRecord | ImageSet,
                       triggered: ImageSet | None = None, target_class: int | None = None) -> dict[str, float]:
    """ACC on the clean test set and ASR on the triggered non-target test images.

    Pass an AttackRecord, or the test set, the triggered set and the target class."""
    if isinstance(record_or_test, AttackRecord):
        test, triggered, target_class = record_or_test.test, record_or_test.triggered, record_or_test.target_class
    else:
        test = record_or_test
    assert triggered is not None and target_class is not None
    return {
        "acc": accuracy(predict(model, test.images), test.labels),
        "asr": attack_success_rate(predict(model, triggered.images), target_class),
    }


def build_record(model: nn.Module, *, method: str, backbone: str, width: int, hparams: dict[str, Any], train: ImageSet,
                 clean_train: ImageSet, test: ImageSet, trigger: Trigger, poisoned: np.ndarray, target_class: int,
                 seed: int = 0, probe: LinearProbe | None = None, losses: pd.DataFrame | None = None,
                 curves: list[dict[str, float]] | None = None, train_seconds: float | None = None) -> AttackRecord:
    """The attack record of a trained `model`; its downstream classifier and before-repair baseline."""
    model = model.to("cpu").eval()
    classifier = downstream_classifier(model, clean_train, seed, probe)
    triggered = triggered_test_set(test, trigger, target_class, seed)
    return AttackRecord(
        model=model, classifier=classifier, train=train, clean_train=clean_train, test=test, triggered=triggered,
        poisoned=np.asarray(poisoned, dtype=bool), target_class=target_class, trigger=trigger, method=method,
        backbone=backbone, width=int(width), hparams=dict(hparams), losses=losses, seed=seed, curves=list(curves or []),
        train_seconds=train_seconds, baseline=classifier_acc_asr(classifier, test, triggered, target_class),
    )
