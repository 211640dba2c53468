"""Fine-Pruning (Liu et al., RAID 2018): prune channels clean data leaves dormant, then fine-tune.

Algorithm. The mean activation of each channel of the encoder's last stage is
measured on the defender's clean images; channels are pruned (zeroed by a mask
on the last stage's output, so the pooled features miss them) in increasing
order of activation, since a backdoor tends to live in neurons clean inputs do
not use. ACC and ASR are recorded at every ratio in `prune_ratios`. At the
chosen ratio (`prune_ratio`, or "auto": the largest listed ratio whose ACC on
the defender's clean images drops by at most `max_acc_drop`, as the paper stops
pruning at a validation-accuracy drop) the pruned classifier, encoder and head,
is fine-tuned on those clean images with SGD (cosine-decayed lr), pruned
channels staying pruned.

The defender's clean data are `clean_images` images of `record.clean_train`
with their true labels, drawn with the record's seed; the test set only scores.

Adaptation to contrastive pretraining: the pruned model is `record.classifier`,
the encoder with the linear probe fitted on clean labels (the supervised
attack's own head for the supervised baseline); pruning acts on the encoder's
last stage, fine-tuning on encoder and probe together.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from cba.progress import tqdm

from cba.augment import build_augment
from cba.defenses.base import AttackRecord, Classifier, Defense, check, classifier_acc_asr, predict, repair_metrics
from cba.defenses.registry import DEFENSES
from cba.errors import is_int, is_number
from cba.evaluate import accuracy, to_float
from cba.fit import fit


@torch.no_grad()
def channel_activations(encoder: nn.Module, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Mean activation of each channel of `encoder.forward_maps` over uint8 images, shape (C,)."""
    encoder.eval()
    device = next(encoder.parameters()).device
    total = None
    for start in range(0, len(images), batch_size):
        maps = encoder.forward_maps(to_float(images[start : start + batch_size]).to(device)).float()
        batch = maps.mean((2, 3)).sum(0)
        total = batch if total is None else total + batch
    return (total / len(images)).cpu()


def pruning_mask(activations: torch.Tensor, ratio: float) -> torch.Tensor:
    """1 for kept channels, 0 for the floor(ratio * C) least active ones (ties broken by index)."""
    order = torch.argsort(activations, stable=True)
    mask = torch.ones(len(activations))
    mask[order[: int(np.floor(ratio * len(activations) + 1e-9))]] = 0.0
    return mask


class ChannelPruner:
    """Multiplies the output of the encoder's last stage by a channel mask (a forward hook)."""

    def __init__(self, encoder: nn.Module):
        self.mask = torch.ones(1)
        self._device = next(encoder.parameters()).device
        self.handle = encoder.stages[-1].register_forward_hook(lambda _module, _inputs, out: out * self.mask)

    def set(self, mask: torch.Tensor) -> None:
        self.mask = mask.view(1, -1, 1, 1).to(self._device)


def finetune(model: Classifier, images: np.ndarray, labels: np.ndarray, epochs: int, lr: float, batch_size: int,
             augment: str, seed: int, progress: bool = False) -> Classifier:
    """SGD fine-tuning of encoder and head on clean labelled images, the lr decaying on a cosine."""
    device = next(model.parameters()).device
    aug = build_augment(augment, images.shape[1]).to(device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # kornia draws its crops from the global generator
    y_all = torch.as_tensor(labels).long()
    model.train()

    def loss(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(aug(to_float(images[idx.numpy()]).to(device))), y_all[idx].to(device))

    # Decaying to zero lets the last steps settle instead of leaving the model mid-jump (a constant lr
    # of 0.01 with momentum cost ~20 points of ACC on a fixture model even without pruning).
    fit(model.parameters(), lambda _: torch.randperm(len(images), generator=gen).split(batch_size), loss,
        epochs=epochs, lr=lr, weight_decay=5e-4, desc="fine-pruning: fine-tune", progress=progress)
    return model.eval()


@DEFENSES.register("fine_pruning")
class FinePruning(Defense):
    kind = "repair"

    def __init__(self, *, prune_ratios: list[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9), prune_ratio: float | str = 0.8,
                 max_acc_drop: float = 0.1, clean_images: int = 1000, finetune_epochs: int = 5, lr: float = 0.01,
                 batch_size: int = 64, augment: str = "weak"):
        ratio_ok = lambda r: is_number(r) and 0 <= r < 1  # noqa: E731
        check(isinstance(prune_ratios, (list, tuple)) and len(prune_ratios) > 0 and all(map(ratio_ok, prune_ratios)),
              "prune_ratios", prune_ratios, "a non-empty list of numbers in [0, 1)")
        check(prune_ratio == "auto" or ratio_ok(prune_ratio), "prune_ratio", prune_ratio, '"auto" or a number in [0, 1)')
        check(isinstance(max_acc_drop, (int, float)) and 0 <= max_acc_drop <= 1, "max_acc_drop", max_acc_drop,
              "a number in [0, 1]")
        for name, value in (("clean_images", clean_images), ("batch_size", batch_size)):
            check(is_int(value) and value >= 1, name, value, "a positive integer")
        check(is_int(finetune_epochs) and finetune_epochs >= 0,
              "finetune_epochs", finetune_epochs, "a non-negative integer")
        check(isinstance(lr, (int, float)) and lr > 0, "lr", lr, "a positive number")
        check(augment in ("weak", "none"), "augment", augment, "weak or none")
        self.prune_ratios = sorted({0.0, *map(float, prune_ratios)})  # 0 is the unpruned baseline
        self.prune_ratio, self.max_acc_drop = prune_ratio, float(max_acc_drop)
        self.clean_images, self.finetune_epochs, self.lr = clean_images, finetune_epochs, float(lr)
        self.batch_size, self.augment = batch_size, augment

    def run(self, record: AttackRecord, progress: bool = False) -> dict[str, Any]:
        rng = np.random.default_rng([record.seed, 0xF1E])
        pick = np.sort(rng.permutation(len(record.clean_train))[: self.clean_images])
        images, labels = record.clean_train.images[pick], record.clean_train.labels[pick]

        model = copy.deepcopy(record.classifier).eval()  # the record stays untouched
        activations = channel_activations(model.encoder, images)
        pruner = ChannelPruner(model.encoder)
        curve = []
        for ratio in tqdm(self.prune_ratios, desc="fine-pruning: prune", disable=not progress):
            pruner.set(pruning_mask(activations, ratio))
            row = classifier_acc_asr(model, record)
            curve.append({"prune_ratio": ratio, "acc": row["acc"], "asr": row["asr"],
                          "clean_acc": accuracy(predict(model, images), labels)})  # the defender's own view
        if self.prune_ratio == "auto":
            allowed = [r["prune_ratio"] for r in curve if curve[0]["clean_acc"] - r["clean_acc"] <= self.max_acc_drop]
            chosen = max(allowed)
        else:
            chosen = float(self.prune_ratio)
        mask = pruning_mask(activations, chosen)
        pruner.set(mask)
        pruned = classifier_acc_asr(model, record)
        finetune(model, images, labels, self.finetune_epochs, self.lr, self.batch_size, self.augment, record.seed, progress)
        after = classifier_acc_asr(model, record)
        pruner.handle.remove()
        return {
            **repair_metrics(record.baseline, after),
            "acc_pruned": pruned["acc"],
            "asr_pruned": pruned["asr"],
            "prune_ratio": chosen,
            "prune_mode": "auto" if self.prune_ratio == "auto" else "fixed",
            "pruned_channels": int((mask == 0).sum()),
            "channels": int(len(mask)),
            "curve": curve,
            "clean_images": len(pick),
            "finetune_epochs": self.finetune_epochs,
            "adaptation": "prunes the last stage of record.classifier's encoder (linear probe on clean labels for SSL; the "
                          "model's own head for the supervised attack), then fine-tunes encoder + head on "
                          f"{len(pick)} clean training images with true labels",
        }
