"""Feature entanglement: do poisoned features sit inside the target class? (claim 2)

Each metric compares the poisoned samples with the CLEAN samples of the target
class, because a successful backdoor maps poisoned inputs to the target; the
question is whether they land inside that cluster (contrastive attacks) or
beside it in a cluster of their own (supervised attacks), which is what
feature-space defenses (Activation Clustering, SCAn, spectral signatures) need.

- ``separability_auroc``: cross-validated AUROC of a linear classifier
  (standardised features, logistic regression) telling poisoned from clean
  target features. ~0.5 = entangled, ~1 = linearly separable.
- ``poison_silhouette``: silhouette of the 2-group labelling poisoned vs clean
  target, with cosine distance (the geometry contrastive losses train).
  ~0 = one cluster, clearly positive = two clusters. By default the two group
  means are averaged, so a 1 % poison group weighs as much as the target class.
- ``centroid_distance_ratio``: mean distance of poisoned samples to the clean
  target centroid over the mean distance of clean target samples to it, on
  L2-normalised features. ~1 = inside the cluster, >>1 = far outside.

Every metric returns NaN when either group has fewer than two samples.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, silhouette_samples
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cba.errors import ConfigError

MIN_GROUP = 2


def _groups(features: np.ndarray, poisoned: np.ndarray, labels: np.ndarray,
            target_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(poisoned features, clean target-class features) as float64 arrays."""
    features = np.asarray(features, dtype=np.float64)
    poisoned = np.asarray(poisoned, dtype=bool)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise ConfigError("features", f"shape {features.shape}", "must be a 2-D array (N, D)")
    if not len(poisoned) == len(labels) == len(features):
        raise ConfigError("poisoned/labels", f"lengths {len(poisoned)}/{len(labels)}",
                          f"must both match the {len(features)} feature rows")
    clean_target = ~poisoned & (labels == target_class)
    return features[poisoned], features[clean_target]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _too_small(*groups: np.ndarray) -> bool:
    return any(len(g) < MIN_GROUP for g in groups)


def separability_auroc(features: np.ndarray, poisoned: np.ndarray, labels: np.ndarray, target_class: int,
                       folds: int = 5, seed: int = 0) -> float:
    """Out-of-fold AUROC of a linear probe separating poisoned from clean target features.

    Stratified k-fold, with k reduced to the size of the smaller group when that
    is below `folds`. Out-of-fold decision scores are pooled into one AUROC.
    Classes are weighted to balance, since poisoned samples are usually few.
    """
    pos, neg = _groups(features, poisoned, labels, target_class)
    if _too_small(pos, neg):
        return math.nan
    x = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos), dtype=int), np.zeros(len(neg), dtype=int)])
    k = max(2, min(int(folds), len(pos), len(neg)))
    scores = np.empty(len(y))
    for train, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y):
        model = make_pipeline(StandardScaler(),
                              LogisticRegression(max_iter=5000, class_weight="balanced"))
        model.fit(x[train], y[train])
        scores[test] = model.decision_function(x[test])
    return float(roc_auc_score(y, scores))


def _cap(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= cap else np.sort(rng.choice(n, size=cap, replace=False))


def poison_silhouette(features: np.ndarray, poisoned: np.ndarray, labels: np.ndarray, target_class: int,
                      max_points: int = 2000, balanced: bool = True, seed: int = 0) -> float:
    """Cosine silhouette of poisoned vs clean target samples, on those samples only.

    Groups are subsampled deterministically (seed) to at most `max_points` in
    all, keeping the smaller group whole where it fits in half the budget.
    `balanced=True` returns the mean of the two per-group mean silhouettes;
    `balanced=False` the plain sklearn mean over all samples, which a large
    target class dominates.
    """
    pos, neg = _groups(features, poisoned, labels, target_class)
    if _too_small(pos, neg):
        return math.nan
    rng = np.random.default_rng(seed)
    half = max(MIN_GROUP, max_points // 2)
    pos = pos[_cap(len(pos), max(half, max_points - min(len(neg), half)), rng)]
    neg = neg[_cap(len(neg), max(half, max_points - len(pos)), rng)]
    x = _normalise(np.concatenate([pos, neg]))
    y = np.concatenate([np.ones(len(pos), dtype=int), np.zeros(len(neg), dtype=int)])
    per_sample = silhouette_samples(x, y, metric="cosine")
    if balanced:
        return float(0.5 * (per_sample[y == 1].mean() + per_sample[y == 0].mean()))
    return float(per_sample.mean())


def centroid_distance_ratio(features: np.ndarray, poisoned: np.ndarray, labels: np.ndarray,
                            target_class: int) -> float:
    """Mean distance of poisoned samples to the clean target centroid, over the target class spread.

    Features are L2-normalised first (contrastive features live on the sphere;
    this removes norm differences that say nothing about direction). The
    centroid is the plain mean of the normalised clean target features.
    """
    pos, neg = _groups(features, poisoned, labels, target_class)
    if _too_small(pos, neg):
        return math.nan
    pos, neg = _normalise(pos), _normalise(neg)
    centroid = neg.mean(axis=0)
    spread = np.linalg.norm(neg - centroid, axis=1).mean()
    if spread <= 0:
        return math.nan
    return float(np.linalg.norm(pos - centroid, axis=1).mean() / spread)


def entanglement_metrics(features: np.ndarray, poisoned: np.ndarray, labels: np.ndarray, target_class: int,
                         folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """All three metrics plus the group sizes they were computed on."""
    pos, neg = _groups(features, poisoned, labels, target_class)
    return {
        "separability_auroc": separability_auroc(features, poisoned, labels, target_class, folds=folds, seed=seed),
        "silhouette": poison_silhouette(features, poisoned, labels, target_class, seed=seed),
        "centroid_distance_ratio": centroid_distance_ratio(features, poisoned, labels, target_class),
        "n_poisoned": int(len(pos)),
        "n_clean_target": int(len(neg)),
    }
