"""Shared pieces of the feature-space data detections (AC, SCAn, spectral).

These defenses were made for supervised models: they inspect the penultimate
features of the training samples class by class. A contrastive encoder has no
classes, so the classes come from one of two sources (param `labels`):

- "kmeans": k-means pseudo-labels of the L2-normalised encoder features, with as
  many clusters as the task has classes. This is what a defender of an SSL
  encoder can do on unlabelled pretraining data.
- "given": the training labels as the victim saw them (`record.train.labels`),
  natural for the supervised attack, whose poisoned samples carry the target label.
"""

from __future__ import annotations

import numpy as np
# sklearn is imported where it is used: stages import every defense module, and most never run one.

from cba.defenses.base import AttackRecord, check
from cba.evaluate import extract_features

LABEL_SOURCES = ("kmeans", "given")


def check_labels_source(labels: str) -> None:
    check(labels in LABEL_SOURCES, "labels", labels, f"choose one of {', '.join(LABEL_SOURCES)}")


def training_features(record: AttackRecord) -> np.ndarray:
    """Encoder features of every training sample, float64 (N, D)."""
    return extract_features(record.encoder, record.train.images).double().numpy()


def pseudo_labels(features: np.ndarray, num_classes: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """k-means cluster ids on L2-normalised features (cosine geometry, as SSL losses use)."""
    from sklearn.cluster import KMeans

    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(num_classes, len(x))
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x).astype(np.int64)


def class_groups(record: AttackRecord, labels_source: str, features: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """{class or k-means cluster id: indices into `record.train`}, empty groups left out."""
    if labels_source == "given":
        labels = np.asarray(record.train.labels)
    elif labels_source == "kmeans":
        features = training_features(record) if features is None else features
        labels = pseudo_labels(features, record.num_classes, record.seed)
    else:
        raise ValueError(f"unknown labels source {labels_source!r}")
    return {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}


def poison_group(groups: dict[int, np.ndarray], poisoned: np.ndarray) -> int:
    """The group holding the most poisoned samples: ground truth, for scoring only."""
    return max(groups, key=lambda c: int(np.asarray(poisoned)[groups[c]].sum()))


def robust_z(values: np.ndarray) -> np.ndarray:
    """(v - median) / (1.4826 * MAD): a z-score that a large outlying minority cannot drag.

    1.4826 makes the MAD a consistent estimate of the standard deviation of a
    normal; a zero MAD falls back to the standard deviation (then to 1)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    centred = v - np.median(v)
    scale = 1.4826 * np.median(np.abs(centred))
    if not scale > 1e-12:
        scale = float(v.std()) if v.std() > 1e-12 else 1.0
    return centred / scale
