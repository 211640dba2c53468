"""DBD: backdoor defense via decoupling the training process.

Huang et al., "Backdoor Defense via Decoupling the Training Process", ICLR 2022.
A poisoned data set backdoors a model trained end to end with labels, because
the labels tie the trigger to the target class. DBD cuts that tie:

1. learn a backbone by self-supervision on the (poisoned) training set, with
   no labels, so the trigger cannot be tied to a class;
2. freeze it and fit a linear head on the victim's labels (poisoned ones
   included) with the symmetric cross-entropy (SCE, alpha CE + beta reverse
   CE), which is robust to the noisy (poisoned) labels;
3. split the samples by the head's SCE loss: the `epsilon` fraction with the
   lowest loss stay labelled ("high-credible"); the rest lose their labels.
   Poisoned samples carry a label that contradicts their features, so DBD
   expects them in the high-loss, unlabelled part;
4. fine-tune backbone and head together, semi-supervised (see `dbd_semi`).

The repaired classifier's ACC and ASR are reported beside the attacked
classifier's, and the split is scored as a detection of the poisoned samples
(score: SCE loss; flagged: the samples whose labels were dropped).

Adaptation to contrastive attacks (`backbone_source`): for an SSL attack the
attacked encoder IS a self-supervised backbone trained on the poisoned data,
i.e. exactly DBD's stage 1, so "pretrained" starts from a copy of it. That is
the paper's point: stage 1 no longer cuts the backdoor, since it is learned by
self-supervision. A supervised encoder has learned the poisoned labels, so
"simclr" trains a fresh SimCLR backbone on the training images instead.
"auto" picks "simclr" for a supervised attack and "pretrained" otherwise.

Simplifications: stage 1 is SimCLR (as in the paper) for a few epochs only,
with temperature 0.2 and crops of at least half the image: on 2,000 synthetic
images that reaches ~39% linear-probe accuracy in 20 epochs, where the
pipeline's pretraining settings (0.5, 0.2) stay near chance (15% after 30), leaving
stage 3 nothing to split on. Stage 2 trains the head on features of
unaugmented images, computed once (so many head epochs are cheap). Stage 4 is
FixMatch-style instead of MixMatch (see `dbd_semi`).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cba.augment import build_augment
from cba.defenses.base import AttackRecord, Classifier, Defense, check, classifier_acc_asr, detection_metrics, repair_metrics
from cba.defenses.registry import DEFENSES
from cba.defenses.dbd_semi import semi_supervised_finetune
from cba.errors import DEVICE_CHOICES, is_int, is_number, is_device
from cba.evaluate import LinearProbe, extract_features, pick_device, train_linear_probe
from cba.models import BACKBONES, build_backbone
from cba.ssl import build_method
from cba.train import TrainConfig, train

SOURCES = ("auto", "pretrained", "simclr")


def sce_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.1, beta: float = 1.0) -> torch.Tensor:
    """Per-sample symmetric cross-entropy (Wang et al. 2019): alpha * CE(q, p) + beta * CE(p, q),
    where q is the one-hot label and p the prediction. As in the reference code,
    p is clamped to [1e-7, 1] and q to [1e-4, 1], so log 0 becomes log 1e-4."""
    labels = labels.long()
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    pred = F.softmax(logits.float(), dim=1).clamp(1e-7, 1.0)
    one_hot = F.one_hot(labels, logits.shape[1]).float().clamp(1e-4, 1.0)
    rce = -(pred * one_hot.log()).sum(1)
    return alpha * ce + beta * rce


def split_by_loss(losses: np.ndarray, epsilon: float) -> np.ndarray:
    """Bool mask of the labelled (high-credible) samples: the round(epsilon * N)
    samples with the lowest loss; ties go to the lower index."""
    losses = np.asarray(losses)
    keep = int(round(epsilon * len(losses)))
    labelled = np.zeros(len(losses), dtype=bool)
    labelled[np.argsort(losses, kind="stable")[:keep]] = True
    return labelled


def train_sce_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int, lr: float,
                   alpha: float, beta: float, batch_size: int, seed: int, progress: bool = False) -> LinearProbe:
    """A linear head on standardised frozen features, trained with SCE (a linear probe with another loss)."""
    return train_linear_probe(features, labels, num_classes, epochs=epochs, lr=lr, weight_decay=5e-4,
                              batch_size=batch_size, seed=seed, desc="dbd head", progress=progress,
                              loss=lambda logits, y: sce_loss(logits, y, alpha, beta).mean())


@DEFENSES.register("dbd")
class DBD(Defense):
    kind = "repair"

    def __init__(self, *, backbone_source: str = "auto", ssl_backbone: str = "convnet", ssl_width: int = 16,
                 ssl_epochs: int = 10, ssl_lr: float = 0.3, ssl_temperature: float = 0.2, ssl_min_scale: float = 0.5,
                 head_epochs: int = 100, head_lr: float = 0.1, sce_alpha: float = 0.1, sce_beta: float = 1.0,
                 epsilon: float = 0.5, semi_epochs: int = 5,
                 lr: float = 0.01, batch_size: int = 128, confidence: float = 0.95, unlabelled_weight: float = 1.0,
                 device: str = "auto"):
        check(backbone_source in SOURCES, "backbone_source", backbone_source, f"choose one of {', '.join(SOURCES)}")
        check(ssl_backbone in BACKBONES, "ssl_backbone", ssl_backbone, f"choose one of {', '.join(BACKBONES.names())}")
        for name, value, low in (("ssl_width", ssl_width, 1), ("ssl_epochs", ssl_epochs, 1), ("head_epochs", head_epochs, 1),
                                 ("semi_epochs", semi_epochs, 0), ("batch_size", batch_size, 2)):
            check(is_int(value) and value >= low, name, value, f"an integer >= {low}")
        for name, value in (("ssl_lr", ssl_lr), ("ssl_temperature", ssl_temperature), ("head_lr", head_lr), ("lr", lr)):
            check(is_number(value) and value > 0, name, value, "a positive number")
        for name, value in (("sce_alpha", sce_alpha), ("sce_beta", sce_beta), ("unlabelled_weight", unlabelled_weight)):
            check(is_number(value) and value >= 0, name, value, "a number >= 0")
        check(sce_alpha + sce_beta > 0, "sce_beta", sce_beta, "sce_alpha + sce_beta must be positive")
        check(is_number(ssl_min_scale) and 0 < ssl_min_scale <= 1, "ssl_min_scale", ssl_min_scale, "a fraction in (0, 1]")
        check(is_number(epsilon) and 0 < epsilon <= 1, "epsilon", epsilon, "a fraction in (0, 1]")
        check(is_number(confidence) and 0 <= confidence <= 1, "confidence", confidence, "a number in [0, 1]")
        check(is_device(device), "device", device, DEVICE_CHOICES)
        self.backbone_source, self.ssl_backbone, self.ssl_width = backbone_source, ssl_backbone, ssl_width
        self.ssl_temperature, self.ssl_min_scale = ssl_temperature, ssl_min_scale
        self.ssl_epochs, self.ssl_lr, self.head_epochs, self.head_lr = ssl_epochs, ssl_lr, head_epochs, head_lr
        self.sce_alpha, self.sce_beta, self.epsilon, self.semi_epochs = sce_alpha, sce_beta, epsilon, semi_epochs
        self.lr, self.batch_size, self.confidence = lr, batch_size, confidence
        self.unlabelled_weight, self.device = unlabelled_weight, device

    def resolve_source(self, record: AttackRecord) -> str:
        if self.backbone_source != "auto":
            return self.backbone_source
        return "simclr" if record.method == "supervised" else "pretrained"

    def self_supervised_backbone(self, record: AttackRecord, source: str, device: torch.device,
                                 progress: bool) -> tuple[nn.Module, str]:
        """DBD stage 1: the backbone and a sentence on where it came from."""
        if source == "pretrained":
            return copy.deepcopy(record.encoder), (
                f"pretrained: stage 1 is a copy of the attacked {record.method} encoder, "
                "itself trained on the poisoned set (self-supervised for an SSL attack)")
        torch.manual_seed(record.seed)
        method = build_method("simclr", build_backbone(self.ssl_backbone, width=self.ssl_width),
                              num_classes=record.num_classes, temperature=self.ssl_temperature)
        config = TrainConfig(epochs=self.ssl_epochs, batch_size=self.batch_size, lr=self.ssl_lr,
                             warmup_epochs=min(2, self.ssl_epochs // 4), seed=record.seed, eval_every=self.ssl_epochs)
        images = record.train.images
        train(method, images, np.zeros(len(images), dtype=np.int64), build_augment("ssl", images.shape[1], min_scale=self.ssl_min_scale), config,
              device, progress=progress)
        return method.encoder, (
            f"simclr: stage 1 trains a fresh SimCLR {self.ssl_backbone} (width {self.ssl_width}) for "
            f"{self.ssl_epochs} epochs on the poisoned training images without labels")

    def run(self, record: AttackRecord, progress: bool = False) -> dict[str, Any]:
        device = pick_device(self.device)
        source = self.resolve_source(record)
        backbone, adaptation = self.self_supervised_backbone(record, source, device, progress)
        backbone.to(device)

        # Stage 2: a linear head with SCE on the frozen backbone, labels as the victim saw them.
        labels = torch.as_tensor(record.train.labels).long()
        feats = extract_features(backbone, record.train.images, device=device)
        head = train_sce_head(feats, labels, record.num_classes, epochs=self.head_epochs, lr=self.head_lr,
                              alpha=self.sce_alpha, beta=self.sce_beta, batch_size=self.batch_size,
                              seed=record.seed, progress=progress)
        with torch.no_grad():
            losses = sce_loss(head(feats), labels, self.sce_alpha, self.sce_beta).numpy()

        # Stage 3: keep the labels of the lowest-loss epsilon fraction.
        labelled = split_by_loss(losses, self.epsilon)

        # Stage 4: semi-supervised fine-tuning of backbone + head.
        model = Classifier(backbone, head)
        semi = semi_supervised_finetune(
            model, record.train.images, record.train.labels, labelled, epochs=self.semi_epochs, lr=self.lr,
            batch_size=self.batch_size, confidence=self.confidence, unlabelled_weight=self.unlabelled_weight,
            seed=record.seed, device=device, progress=progress)
        model.to("cpu").eval()

        poisoned = np.asarray(record.poisoned, dtype=bool)
        out: dict[str, Any] = {
            **detection_metrics(losses, poisoned, ~labelled),
            **repair_metrics(record.baseline, classifier_acc_asr(model, record)),
            "adaptation": adaptation,
            "backbone_source": source,
            "labelled": int(labelled.sum()),
            "poisoned_labelled": int((labelled & poisoned).sum()),
            "mean_loss_poisoned": float(losses[poisoned].mean()) if poisoned.any() else float("nan"),
            "mean_loss_clean": float(losses[~poisoned].mean()) if (~poisoned).any() else float("nan"),
            **semi,
        }
        return out
