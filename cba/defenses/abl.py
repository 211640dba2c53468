"""Anti-Backdoor Learning (Li et al., NeurIPS 2021): isolate, then unlearn.

Algorithm. A backdoor is an easier task than the benign one, so poisoned
samples reach a low training loss within the first epochs. (1) Isolation:
train a fresh model for a few epochs with local gradient ascent (LGA: the batch
loss is flipped to ascent whenever it falls below `lga_gamma`, which keeps
clean losses up), score every sample's loss, and isolate the lowest-loss
`isolation_rate` fraction. (2) Unlearning: from the trained (victim) model,
ascend the isolated samples' loss with a small learning rate.

SSL adaptation. "Loss" is the method's own per-sample loss (NT-Xent, InfoNCE,
BYOL regression; cross-entropy for the supervised baseline). A one-view loss
is scored and unlearned on raw images, as ABL does; multi-view SSL losses need
the method's augmented views. `loss_source: log` skips the LGA run and ranks
the pretraining run's own per-sample loss log (mean or last of the first
`isolation_epochs` epochs): cheaper, but those losses were taken on augmented
views, which blurs the separation. `bounded_ascent` stops ascending once the
isolated batch is no easier than the other samples: plain ascent is unbounded
and collapses a weak model onto one class. After unlearning, a supervised
model keeps its own head; an SSL encoder is re-read with a linear probe
refitted on clean labels. The paper's claim 1 predicts that isolation fails
for contrastive attacks, whose poisoned and clean losses fall alike.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cba.augment import build_augment
from cba.defenses.base import AttackRecord, Classifier, Defense, check, classifier_acc_asr, detection_metrics, repair_metrics
from cba.defenses.registry import DEFENSES
from cba.defenses.downstream_ft import probe_acc_asr, record_probe
from cba.errors import DEVICE_CHOICES, ConfigError, is_int, is_number, is_device
from cba.evaluate import pick_device
from cba.fit import fit
from cba.record import own_head
from cba.models import build_backbone
from cba.ssl import SSLMethod, build_method
from cba.train import TrainConfig, epoch_batches, train

EPOCH_MODES = ("mean", "last")
LOSS_SOURCES = ("log", "retrain_lga")


def loss_matrix(frame: pd.DataFrame, n: int) -> np.ndarray:
    """The long per-sample loss log as (epochs, n); samples missing from an epoch are NaN."""
    epochs = np.sort(frame["epoch"].unique())
    matrix = np.full((len(epochs), n), np.nan, dtype=np.float64)
    matrix[np.searchsorted(epochs, frame["epoch"].to_numpy()), frame["index"].to_numpy()] = frame["loss"].to_numpy()
    return matrix


def isolation_loss(matrix: np.ndarray, epochs: int, mode: str) -> np.ndarray:
    """Each sample's loss over the first `epochs` epochs: their mean, or the last of them."""
    window = matrix[: max(1, min(epochs, len(matrix)))]
    with warnings.catch_warnings():  # an all-NaN column (never logged) is expected, not an error
        warnings.simplefilter("ignore", RuntimeWarning)
        loss = np.nanmean(window, axis=0) if mode == "mean" else window[-1].copy()
    return np.where(np.isnan(loss), np.inf, loss)  # a sample never seen is never isolated


def isolate(loss: np.ndarray, rate: float) -> np.ndarray:
    """Bool mask of exactly the round(rate * n) lowest-loss samples (at least one; ties by index)."""
    flagged = np.zeros(len(loss), dtype=bool)
    flagged[np.argsort(loss, kind="stable")[: max(1, int(round(rate * len(loss))))]] = True
    return flagged


def copy_method(record: AttackRecord) -> SSLMethod:
    """A copy of the attacked method (encoder, heads, momentum state) that ABL may train without touching the record."""
    return copy.deepcopy(record.model)


def _batch_loss(method: SSLMethod, augment: nn.Module, data: torch.Tensor, labels: torch.Tensor,
                idx: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """The method's loss on augmented views of data[idx] (uint8 NCHW): the batch mean, or per sample."""
    x = data[idx].float().div_(255)
    views = [augment(x).contiguous(memory_format=torch.channels_last) for _ in range(method.num_views)]
    return method.loss(views, labels[idx])[1 if per_sample else 0]


def loss_augment(method: SSLMethod, image_size: int) -> nn.Module:
    """Views on which ABL scores and unlearns: raw images for a one-view (supervised) loss, as ABL does;
    crops there can cut a patch trigger away, and ascending on such views unlearns the class, not the
    trigger. Multi-view (SSL) losses are only defined on augmented views, so they keep the method's own."""
    return build_augment("none" if method.num_views == 1 else method.augmentation, image_size)


@torch.no_grad()
def per_sample_losses(method: SSLMethod, augment: nn.Module, images: np.ndarray, labels: np.ndarray, seed: int,
                      batch_size: int = 512) -> np.ndarray:
    """The method's per-sample loss of every image, in eval mode (float64, (N,)).

    A short last batch is topped up from the start: contrastive losses grow with
    the batch (more negatives), and a small batch would make its samples look easy."""
    device = next(method.parameters()).device
    method.eval()
    augment.to(device)
    torch.manual_seed(seed)
    data = torch.as_tensor(images).permute(0, 3, 1, 2).to(device)
    targets = torch.as_tensor(labels).long().to(device)
    n, out = len(images), []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, start + batch_size) % n if n >= batch_size else torch.arange(n)
        loss = _batch_loss(method, augment, data, targets, idx.to(device), per_sample=True).float().cpu()
        out.append(loss[: min(batch_size, n - start)])
    return torch.cat(out).double().numpy()


class _LGA(SSLMethod):
    """Wraps a method so its batch loss follows ABL's local gradient ascent: sign(L - gamma) * L."""

    def __init__(self, inner: SSLMethod, gamma: float):
        super().__init__(inner.backbone, inner.num_classes)
        self.inner, self.gamma = inner, gamma
        self.num_views, self.augmentation, self.uses_labels = inner.num_views, inner.augmentation, inner.uses_labels

    def loss(self, views, labels):
        loss, per_sample = self.inner.loss(views, labels)
        return torch.sign(loss.detach() - self.gamma) * loss, per_sample

    def after_step(self, progress: float) -> None:
        self.inner.after_step(progress)


@DEFENSES.register("abl")
class ABL(Defense):
    kind = "data_detection"

    def __init__(self, *, isolation_rate: float = 0.05, isolation_epochs: int = 5, epoch_mode: str = "mean",
                 loss_source: str = "log", lga_gamma: float = 0.5, lga_lr: float = 0.1,
                 lga_batch_size: int = 64, unlearn_epochs: int = 5, unlearn_lr: float = 5e-4,
                 unlearn_batch_size: int = 64, bounded_ascent: bool = True, clean_finetune: bool = False,
                 device: str = "auto"):
        check(is_number(isolation_rate) and 0 < isolation_rate < 1, "isolation_rate", isolation_rate,
              "a number in (0, 1)")
        for name, value in (("isolation_epochs", isolation_epochs), ("lga_batch_size", lga_batch_size),
                            ("unlearn_batch_size", unlearn_batch_size)):
            check(is_int(value) and value >= 1, name, value, "a positive integer")
        check(is_int(unlearn_epochs) and unlearn_epochs >= 0, "unlearn_epochs", unlearn_epochs,
              "a non-negative integer (0 skips unlearning)")
        check(epoch_mode in EPOCH_MODES, "epoch_mode", epoch_mode, f"choose one of {', '.join(EPOCH_MODES)}")
        check(loss_source in LOSS_SOURCES, "loss_source", loss_source, f"choose one of {', '.join(LOSS_SOURCES)}")
        for name, value in (("lga_gamma", lga_gamma), ("unlearn_lr", unlearn_lr)):
            check(is_number(value) and value >= 0, name, value, "a non-negative number")
        check(is_number(lga_lr) and lga_lr > 0, "lga_lr", lga_lr, "a positive number")
        for name, value in (("bounded_ascent", bounded_ascent), ("clean_finetune", clean_finetune)):
            check(isinstance(value, bool), name, value, "true or false")
        check(is_device(device), "device", device, DEVICE_CHOICES)
        self.isolation_rate, self.isolation_epochs, self.epoch_mode = float(isolation_rate), isolation_epochs, epoch_mode
        self.loss_source, self.lga_gamma, self.lga_lr, self.lga_batch_size = loss_source, lga_gamma, lga_lr, lga_batch_size
        self.unlearn_epochs, self.unlearn_lr, self.unlearn_batch_size = unlearn_epochs, unlearn_lr, unlearn_batch_size
        self.bounded_ascent, self.clean_finetune = bounded_ascent, clean_finetune
        self.device = device

    def isolation_losses(self, record: AttackRecord, progress: bool = False) -> tuple[np.ndarray, int]:
        """Per-sample isolation loss (lower = more suspicious) and the number of epochs it covers."""
        if self.loss_source == "retrain_lga":
            return self._lga_losses(record, progress), self.isolation_epochs
        if record.losses is None:
            raise ConfigError("loss_source", "log",
                              "the attack record has no per-sample loss log; use retrain_lga")
        matrix = loss_matrix(record.losses, len(record.train))
        return isolation_loss(matrix, self.isolation_epochs, self.epoch_mode), min(self.isolation_epochs, len(matrix))

    def _lga_losses(self, record: AttackRecord, progress: bool) -> np.ndarray:
        """ABL's isolation run: a freshly initialised method of the attacked one's architecture, trained
        with LGA for `isolation_epochs`, then each sample's loss under it (eval mode, as ABL scores)."""
        torch.manual_seed(record.seed)
        method = build_method(record.method, build_backbone(record.backbone, width=record.width),
                              num_classes=record.num_classes, **record.hparams)
        config = TrainConfig(epochs=self.isolation_epochs, batch_size=self.lga_batch_size, lr=self.lga_lr, warmup_epochs=0,
                             seed=record.seed, eval_every=self.isolation_epochs)
        size = record.train.images.shape[1]
        train(_LGA(method, self.lga_gamma), record.train.images, record.train.labels,
              build_augment(method.augmentation, size), config, pick_device(self.device), progress=progress)
        return per_sample_losses(method, loss_augment(method, size), record.train.images, record.train.labels, record.seed)

    def unlearn(self, method: SSLMethod, record: AttackRecord, isolated: np.ndarray,
                progress: bool = False) -> tuple[SSLMethod, dict[str, Any]]:
        """Gradient ascent on the isolated samples (plus descent on the rest if `clean_finetune`).

        BatchNorm stays in eval mode: batches of only isolated (mostly triggered)
        images would otherwise drag the running statistics away from clean data.
        With `bounded_ascent`, a batch is ascended only while its loss is below the
        mean loss of the other samples (measured once, before): plain ascent is
        unbounded and, on a weak model, collapses it onto one class within steps."""
        device = pick_device(self.device)
        method.to(device).to(memory_format=torch.channels_last).eval()
        augment = loss_augment(method, record.train.images.shape[1]).to(device)
        data = torch.as_tensor(record.train.images).permute(0, 3, 1, 2).contiguous().to(device)
        labels = torch.as_tensor(record.train.labels).long().to(device)
        bad, rest = torch.as_tensor(np.flatnonzero(isolated)), torch.as_tensor(np.flatnonzero(~isolated))
        ceiling = float("inf")
        if self.bounded_ascent and len(rest):
            sample = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(record.seed))[:2048]].numpy()
            ceiling = float(per_sample_losses(method, augment, record.train.images[sample], record.train.labels[sample],
                                              record.seed, batch_size=self.unlearn_batch_size).mean())
        torch.manual_seed(record.seed)
        gen = torch.Generator().manual_seed(record.seed)
        counts = {"ascent": 0}

        def loss(idx: torch.Tensor) -> torch.Tensor | None:
            terms = []
            bad_loss = _batch_loss(method, augment, data, labels, bad[idx].to(device))
            if float(bad_loss.detach()) < ceiling:
                terms.append(-bad_loss)
                counts["ascent"] += 1
            if self.clean_finetune and len(rest):
                pick = rest[torch.randint(len(rest), (self.unlearn_batch_size,), generator=gen)]
                terms.append(_batch_loss(method, augment, data, labels, pick.to(device)))
            return sum(terms) if terms else None

        # A constant rate, as ABL unlearns.
        fit(method.parameters(), lambda _: epoch_batches(len(bad), self.unlearn_batch_size, gen), loss,
            epochs=self.unlearn_epochs, lr=self.unlearn_lr, weight_decay=1e-4, cosine=False, desc="abl unlearn",
            progress=progress)
        ascent_steps = counts["ascent"]
        stats = {"unlearn_ascent_steps": ascent_steps, "unlearn_ceiling": ceiling if np.isfinite(ceiling) else None}
        return method.to("cpu").eval(), stats

    def acc_asr(self, method: SSLMethod, record: AttackRecord, probe: Any = None) -> dict[str, Any]:
        """Supervised: the model's own head. SSL: linear probe refitted on clean labels (plus kNN), or `probe`."""
        if own_head(method) is not None:
            return classifier_acc_asr(Classifier(method.encoder, own_head(method)), record)
        return probe_acc_asr(method.encoder, record, probe)

    def run(self, record: AttackRecord, progress: bool = False) -> dict[str, Any]:
        loss, epochs_used = self.isolation_losses(record, progress)
        isolated = isolate(loss, self.isolation_rate)
        out: dict[str, Any] = detection_metrics(-loss, record.poisoned, isolated)  # poisoned: scoring only
        out["isolation_precision"] = out["precision"]
        poisoned = np.asarray(record.poisoned, dtype=bool)
        finite = np.isfinite(loss)
        out["mean_loss_poisoned"] = float(loss[poisoned & finite].mean()) if (poisoned & finite).any() else float("nan")
        out["mean_loss_clean"] = float(loss[~poisoned & finite].mean()) if (~poisoned & finite).any() else float("nan")
        method = copy_method(record)
        before = self.acc_asr(method, record, record_probe(record))  # the copy is the record's encoder
        method, stats = self.unlearn(method, record, isolated, progress)
        after = self.acc_asr(method, record)
        out.update(repair_metrics(record.baseline, after))
        out.update({f"{k}_{tag}": v for tag, m in (("before", before), ("after", after)) for k, v in m.items()
                    if k not in ("acc", "asr")})
        out["isolation_epochs_used"] = int(epochs_used)
        out.update(stats)
        source = (f"after {self.isolation_epochs} epochs of LGA training from scratch (gamma={self.lga_gamma})"
                  if self.loss_source == "retrain_lga" else
                  f"{self.epoch_mode} over the first {self.isolation_epochs} epochs of the pretraining log")
        out["adaptation"] = (
            f"isolation ranks the method's own per-sample {'cross-entropy' if method.uses_labels else 'SSL'} loss "
            f"({source}); unlearning ascends that loss on "
            f"{'raw images' if method.num_views == 1 else 'augmented views'} of the isolated samples"
            + ("" if method.uses_labels else "; ACC/ASR from a linear probe refitted on clean labelled data"))
        return out
