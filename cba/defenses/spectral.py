"""Spectral signatures (Tran, Li and Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018).

Algorithm: within each class, centre the penultimate features and take their
top right singular vector v. A backdoor leaves a strong direction in the
class's feature covariance, so poisoned samples project far along v. The
original score is the squared projection ((x - mean) . v)^2; the samples with
the top `removal_factor * expected_rate` fraction of scores in each class are
removed (the defender's assumed poison budget times a safety factor of 1.5).

Adaptation to contrastive pretraining: the features are the encoder's
(`record.encoder`) and the classes are k-means pseudo-labels of those features
(`labels: kmeans`) or the training labels (`labels: given`, the supervised case).

Scoring across classes: squared projections are only comparable within a class,
and when poison is a large share of its class (dirty-label BadNets at 5% puts a
third of the target class), centring on the class mean places the clean majority
far from the centre too. So each sample's score is its squared robust z-score
along v: (proj - median) / (1.4826 * MAD), with median and MAD over its class.
This keeps the within-class ranking of the original (the clean majority sets the
median) and makes the scores of different classes poolable for one AUROC.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cba.progress import tqdm

from cba.defenses.base import AttackRecord, Defense, check, detection_metrics
from cba.defenses.registry import DEFENSES
from cba.defenses.features import check_labels_source, class_groups, poison_group, robust_z, training_features

ADAPTATION = ("Features from the contrastive encoder; per-class statistics over k-means pseudo-labels of the "
              "features (labels=kmeans) or the training labels (labels=given). Scores are squared robust z-scores "
              "of the projection on each class's top singular vector, so classes pool into one AUROC.")


def top_direction(features: np.ndarray) -> np.ndarray:
    """The top right singular vector of the mean-centred features (unit norm)."""
    centred = features - features.mean(0)
    return np.linalg.svd(centred, full_matrices=False)[2][0]


def spectral_scores(features: np.ndarray, groups: dict[int, np.ndarray], remove_fraction: float,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample scores (higher = more suspicious) and the removal decision."""
    scores = np.zeros(len(features))
    flagged = np.zeros(len(features), dtype=bool)
    for idx in tqdm(groups.values(), desc="spectral", unit="class", disable=not progress):
        if len(idx) < 3:  # no direction to speak of
            continue
        proj = features[idx] @ top_direction(features[idx])
        scores[idx] = robust_z(proj) ** 2
        n_remove = int(np.floor(remove_fraction * len(idx)))
        if n_remove:
            flagged[idx[np.argsort(-scores[idx], kind="stable")[:n_remove]]] = True
    return scores, flagged


@DEFENSES.register("spectral")
class SpectralSignatures(Defense):
    kind = "data_detection"

    def __init__(self, *, labels: str = "kmeans", expected_rate: float = 0.05, removal_factor: float = 1.5):
        check_labels_source(labels)
        check(0 < expected_rate < 1, "expected_rate", expected_rate, "a fraction in (0, 1)")
        check(removal_factor > 0 and expected_rate * removal_factor <= 1, "removal_factor",
              removal_factor, "a positive factor with expected_rate * removal_factor <= 1")
        self.labels, self.expected_rate, self.removal_factor = labels, expected_rate, removal_factor

    def run(self, record: AttackRecord, progress: bool = False) -> dict[str, Any]:
        features = training_features(record)
        groups = class_groups(record, self.labels, features)
        scores, flagged = spectral_scores(features, groups, self.expected_rate * self.removal_factor, progress)
        poisoned = np.asarray(record.poisoned, dtype=bool)
        out = detection_metrics(scores, poisoned, flagged)
        out.update(
            labels=self.labels,
            remove_fraction=self.expected_rate * self.removal_factor,
            poison_group=poison_group(groups, poisoned),
            per_class=[{"group": c, "size": int(len(idx)), "flagged": int(flagged[idx].sum()),
                        "positives": int(poisoned[idx].sum()),
                        "positives_flagged": int((flagged & poisoned)[idx].sum())}
                       for c, idx in groups.items()],
            adaptation=ADAPTATION,
        )
        return out
