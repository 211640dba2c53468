"""Activation Clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural
Networks by Activation Clustering", AAAI SafeAI workshop 2019, arXiv 1811.03728).

Algorithm: within each class, reduce the penultimate activations to a few
dimensions (ICA to 10 components in the paper; PCA offered too) and split them
with 2-means. A poisoned class holds two populations (its own samples and the
triggered ones), so it splits into a large and a small, well-separated cluster;
a clean class splits arbitrarily. The smaller cluster is flagged as poisoned when
its relative size is below `size_threshold` (0.35 in the paper; `criterion: size`)
or when the split's silhouette score exceeds `silhouette_threshold`
(`criterion: silhouette`, the paper's alternative). Silhouette values depend on the
reduction: ICA whitens every component to unit variance, which lowers them.

Adaptation to contrastive pretraining: the activations are the encoder's features
(`record.encoder`) and the classes are k-means pseudo-labels of those features
(`labels: kmeans`) or the training labels (`labels: given`, the supervised case).

Score per sample, for an AUROC across classes: (1 - relative size of the
sample's cluster) * max(silhouette of its class's split, 0). Samples of a small
cluster in a cleanly split class score high; both halves of an arbitrary split
of a clean class score low because its silhouette is low.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
# sklearn is imported where it is used: stages import every defense module, and most never run this one.
from cba.progress import tqdm

from cba.defenses.base import AttackRecord, Defense, check, detection_metrics
from cba.defenses.registry import DEFENSES
from cba.defenses.features import check_labels_source, class_groups, poison_group, training_features

ADAPTATION = ("Activations are the contrastive encoder's features; per-class clustering over k-means "
              "pseudo-labels of the features (labels=kmeans) or the training labels (labels=given).")
REDUCTIONS = ("ica", "pca")
CRITERIA = ("size", "silhouette")


def reduce_features(features: np.ndarray, method: str, components: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA, FastICA
    from sklearn.exceptions import ConvergenceWarning

    k = max(1, min(components, features.shape[1], len(features) - 1))
    if method == "pca":
        return PCA(k, random_state=seed).fit_transform(features)
    with warnings.catch_warnings():  # FastICA often stops at max_iter on small classes; the components stay usable
        warnings.simplefilter("ignore", ConvergenceWarning)
        return FastICA(k, whiten="unit-variance", max_iter=1000, random_state=seed).fit_transform(features)


def split_class(reduced: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """2-means on one class: (cluster id per sample, silhouette of the split)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    assignment = KMeans(2, n_init=10, random_state=seed).fit_predict(reduced)
    if len(np.unique(assignment)) < 2:
        return assignment, 0.0
    return assignment, float(silhouette_score(reduced, assignment))


def cluster_classes(features: np.ndarray, groups: dict[int, np.ndarray], *, reduce: str, components: int,
                    criterion: str, size_threshold: float, silhouette_threshold: float, seed: int,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Scores, flags and one row per class (size, minority fraction, silhouette, flagged)."""
    scores = np.zeros(len(features))
    flagged = np.zeros(len(features), dtype=bool)
    rows = []
    for c, idx in tqdm(groups.items(), desc="activation clustering", unit="class", disable=not progress):
        row: dict[str, Any] = {"group": c, "size": int(len(idx)), "minority_fraction": 0.0, "silhouette": 0.0,
                               "flagged": False}
        rows.append(row)
        if len(idx) < 4:  # too few to split
            continue
        assignment, silhouette = split_class(reduce_features(features[idx], reduce, components, seed), seed)
        fraction = np.bincount(assignment, minlength=2) / len(idx)
        minority = int(np.argmin(fraction))
        scores[idx] = (1 - fraction[assignment]) * max(silhouette, 0.0)
        suspicious = fraction[minority] < size_threshold if criterion == "size" else silhouette > silhouette_threshold
        flagged[idx[assignment == minority]] = suspicious
        row.update(minority_fraction=float(fraction[minority]), silhouette=silhouette, flagged=bool(suspicious))
    return scores, flagged, rows


@DEFENSES.register("activation_clustering")
class ActivationClustering(Defense):
    kind = "data_detection"

    def __init__(self, *, labels: str = "kmeans", reduce: str = "ica", components: int = 10, criterion: str = "size",
                 size_threshold: float = 0.35, silhouette_threshold: float = 0.15):
        check_labels_source(labels)
        check(reduce in REDUCTIONS, "reduce", reduce, f"choose one of {', '.join(REDUCTIONS)}")
        check(isinstance(components, int) and components >= 1, "components", components, "an integer >= 1")
        check(criterion in CRITERIA, "criterion", criterion, f"choose one of {', '.join(CRITERIA)}")
        check(0 < size_threshold <= 0.5, "size_threshold", size_threshold, "a fraction in (0, 0.5]")
        check(-1 <= silhouette_threshold <= 1, "silhouette_threshold", silhouette_threshold,
              "a value in [-1, 1]")
        self.labels, self.reduce, self.components, self.criterion = labels, reduce, components, criterion
        self.size_threshold, self.silhouette_threshold = size_threshold, silhouette_threshold

    def run(self, record: AttackRecord, progress: bool = False) -> dict[str, Any]:
        features = training_features(record)
        groups = class_groups(record, self.labels, features)
        scores, flagged, rows = cluster_classes(
            features, groups, reduce=self.reduce, components=self.components, criterion=self.criterion,
            size_threshold=self.size_threshold, silhouette_threshold=self.silhouette_threshold, seed=record.seed,
            progress=progress)
        poisoned = np.asarray(record.poisoned, dtype=bool)
        for row in rows:  # ground truth per class, for the report only
            idx = groups[row["group"]]
            row.update(positives=int(poisoned[idx].sum()), positives_flagged=int((flagged & poisoned)[idx].sum()))
        out = detection_metrics(scores, poisoned, flagged)
        out.update(labels=self.labels, reduce=self.reduce, criterion=self.criterion,
                   flagged_classes=[row["group"] for row in rows if row["flagged"]],
                   poison_group=poison_group(groups, poisoned), per_class=rows, adaptation=ADAPTATION)
        return out
