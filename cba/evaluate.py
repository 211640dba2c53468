"""Feature extraction, kNN and linear-probe classifiers, ACC and ASR.

ASR follows the usual convention: only test images whose true class is not
the target are triggered, and ASR is the fraction of them classified as the
target. ACC is measured on the clean test set.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cba.errors import ConfigError
from cba.probe import LinearProbe, ProbeFit, fit_linear_probe, probe_predict, train_linear_probe  # noqa: F401 (re-exported)

# The kNN reader's defaults (finetune.knn in params.yaml): k neighbours, votes weighted by exp(cosine / temperature).
KNN_K = 200
KNN_TEMPERATURE = 0.1


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    return x.permute(0, 3, 1, 2).float().div_(255)


@torch.no_grad()
def extract_features(encoder: nn.Module, images: np.ndarray, batch_size: int = 512,
                     device: torch.device | None = None) -> torch.Tensor:
    """Encoder features of uint8 images, in eval mode, as float32 on the CPU."""
    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start : start + batch_size]).to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(encoder(x).float().cpu())
    encoder.train(was_training)
    features = torch.cat(out) if out else torch.empty(0)
    if not torch.isfinite(features).all():
        # NaN features argmax to class 0 and would read as a perfect backdoor on target 0.
        bad = int((~torch.isfinite(features)).any(1).sum())
        raise ConfigError("encoder", f"{bad} of {len(features)} images with non-finite features",
                          "finite features (the weights are NaN or inf: did pretraining diverge? lower pretrain.lr)")
    return features


def feature_readers(encoders: dict[str, nn.Module]) -> dict[str, Callable[[np.ndarray], torch.Tensor]]:
    """Named readers of uint8 images: `raw pixels` (the flattened image in [0, 1], what any reader gets without
    an encoder), then each encoder's frozen features, in the order given."""
    readers: dict[str, Callable[[np.ndarray], torch.Tensor]] = {
        "raw pixels": lambda images: to_float(images).flatten(1)}
    for label, encoder in encoders.items():
        readers[label] = lambda images, encoder=encoder: extract_features(encoder, images)
    return readers


@torch.no_grad()
def knn_votes(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN on cosine similarity (Wu et al. 2018): each of the k nearest
    neighbours votes for its label with weight exp(similarity / temperature).
    Returns the (N, num_classes) vote totals."""
    bank = F.normalize(train_features.float(), dim=1)
    labels = torch.as_tensor(train_labels).long()
    k = min(k, len(bank))
    votes = []
    for start in range(0, len(test_features), chunk):
        q = F.normalize(test_features[start : start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        part = torch.zeros(len(q), num_classes)
        part.scatter_add_(1, labels[idx], (sim / temperature).exp())
        votes.append(part)
    return torch.cat(votes) if votes else torch.empty(0, num_classes)


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> torch.Tensor:
    """The class with the most weighted votes (`knn_votes`), per test feature."""
    return knn_votes(train_features, train_labels, test_features, num_classes, k, temperature, chunk).argmax(1).long()


def accuracy(preds: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
    labels = torch.as_tensor(labels)
    return float((preds.cpu() == labels.cpu()).float().mean()) if len(labels) else float("nan")


def non_target_mask(labels: np.ndarray, target_class: int) -> np.ndarray:
    """Which test images count for ASR: those whose true class is not the target."""
    return np.asarray(labels) != target_class


def attack_success_rate(preds_on_triggered: torch.Tensor, target_class: int) -> float:
    """Fraction of triggered non-target images classified as the target.

    `preds_on_triggered` must already be restricted to non-target images
    (see `non_target_mask`)."""
    if len(preds_on_triggered) == 0:
        return float("nan")
    return float((preds_on_triggered.cpu() == target_class).float().mean())


def knn_backdoor_metrics(
    encoder: nn.Module, bank_images: np.ndarray, bank_labels: np.ndarray, test_images: np.ndarray,
    test_labels: np.ndarray, triggered_images: np.ndarray, target_class: int, num_classes: int, k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> dict[str, float]:
    """kNN ACC on clean test images and kNN ASR on triggered non-target ones,
    with a memory bank of clean labelled images."""
    bank = extract_features(encoder, bank_images)
    labels = torch.as_tensor(bank_labels)
    clean = knn_predict(bank, labels, extract_features(encoder, test_images), num_classes, k, temperature)
    trig = knn_predict(bank, labels, extract_features(encoder, triggered_images), num_classes, k, temperature)
    return {"knn_acc": accuracy(clean, test_labels), "knn_asr": attack_success_rate(trig, target_class)}


def evaluate_encoder(
    encoder: nn.Module, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
    test_labels: np.ndarray, triggered_images: np.ndarray, target_class: int, num_classes: int, **options: Any,
) -> tuple[dict[str, dict], ProbeFit]:
    """ACC and ASR of an encoder by kNN and by the converged linear probe (`cba.probe`), both fitted on clean
    labelled data.

    Extracts the three sets' features and reads them with `evaluate_features`, which takes the same `options`."""
    return evaluate_features(extract_features(encoder, train_images), train_labels,
                             extract_features(encoder, test_images), test_labels,
                             extract_features(encoder, triggered_images), target_class, num_classes, **options)


def evaluate_features(
    train_feats: torch.Tensor, train_labels: np.ndarray, test_feats: torch.Tensor, test_labels: np.ndarray,
    trig_feats: torch.Tensor, target_class: int, num_classes: int, k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
    triggered_labels: np.ndarray | None = None, probe_options: dict | None = None, seed: int = 0,
    probe: LinearProbe | None = None,
) -> tuple[dict[str, dict], ProbeFit]:
    """ACC and ASR by kNN and by the converged linear probe, from features already extracted by one encoder.

    Per classifier: `acc`, `asr`, `natural_rate` (non-target clean images sent to the target: the floor ASR must
    clear), `landing` (how many triggered images each class received) and, given the triggered images' true
    labels, `robust_acc` (triggered images still classified as their true class, BackdoorBench's RA). A `probe`
    already fitted to this encoder's features is used as it is instead of fitting one. Readers of several
    triggered sets on one encoder extract the clean features once and call this per set."""
    labels = torch.as_tensor(train_labels)
    fit = ProbeFit(probe, float("nan")) if probe is not None else \
        fit_linear_probe(train_feats, labels, num_classes, seed=seed, **(probe_options or {}))
    knn = lambda feats: knn_predict(train_feats, labels, feats, num_classes, k, temperature)  # noqa: E731
    non_target = torch.as_tensor(non_target_mask(test_labels, target_class))
    metrics: dict[str, dict] = {}
    for name, predict in (("knn", knn), ("linear", lambda feats: probe_predict(fit.probe, feats))):
        clean_preds, trig_preds = predict(test_feats), predict(trig_feats)
        metrics[name] = {
            "acc": accuracy(clean_preds, test_labels), "asr": attack_success_rate(trig_preds, target_class),
            # The ASR baseline: non-target test images predicted as the target WITHOUT the trigger.
            "natural_rate": attack_success_rate(clean_preds[non_target], target_class),
            "landing": torch.bincount(trig_preds.long(), minlength=num_classes).tolist(),
        }
        if triggered_labels is not None:
            metrics[name]["robust_acc"] = accuracy(trig_preds, triggered_labels)
    return metrics, fit


def read_triggered_sets(
    encoder: nn.Module, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
    test_labels: np.ndarray, triggered_sets: list[np.ndarray], target_class: int, num_classes: int, **options: Any,
) -> list[dict[str, dict]]:
    """`evaluate_features` for several triggered versions of one test set, read by one encoder: its clean
    features are extracted once and its probe fitted once, so only what the trigger changes differs between
    the readings. `options` as for `evaluate_features`."""
    train_feats, test_feats = extract_features(encoder, train_images), extract_features(encoder, test_images)
    probe, readings = None, []
    for images in triggered_sets:
        metrics, fit = evaluate_features(train_feats, train_labels, test_feats, test_labels,
                                         extract_features(encoder, images), target_class, num_classes,
                                         probe=probe, **options)
        probe = fit.probe
        readings.append(metrics)
    return readings
