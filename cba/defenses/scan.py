"""SCAn, the statistical contamination analyzer (Tang et al., "Demon in the Variant:
Statistical Analysis of DNNs for Robust Backdoor Contamination Detection",
USENIX Security 2021).

Algorithm. Two-component decomposition: a representation is r = mu_class + eps,
with class identities mu ~ N(0, S_mu) and within-class variation eps ~ N(0, S_eps)
shared by all classes. S_mu and S_eps are estimated by EM from a small clean set
(the global model). Then each class of the inspected data is untangled into two
subgroups with their own identities and the shared S_eps (2-means under the
Mahalanobis metric S_eps^-1), and the log-likelihood-ratio statistic
    J = mean_i [ |x_i - mu|^2_F - |x_i - mu_g(i)|^2_F ],  F = S_eps^-1
compares the two-subgroup model with the one-identity model (mu: the class's
posterior identity). A contaminated class mixes two identities, so its J is an
outlier: J* = (J - median) / (1.4826 * MAD) over classes, and a class is flagged
when J* > e^2 (about 7.389, the paper's threshold); its minority subgroup is
flagged as the poisoned samples.

Adaptation to contrastive pretraining: the representations are the encoder's
features; the inspected classes are k-means pseudo-labels of the training
features (`labels: kmeans`) or the training labels (`labels: given`, the
supervised case). The defender's clean set is held-out clean data: a random
`clean_set_size` subsample of `record.test` with its true labels (in both label
modes: the global model needs labelled identities, and a defender of an SSL
encoder holds such a set anyway to fit the downstream probe). S_eps gets a small
ridge (`ridge` times its mean eigenvalue) because a clean set of a few hundred
images estimates a 128-512 dimensional covariance poorly.

Score per sample, for an AUROC: J* of its class plus its posterior probability of
belonging to the class's minority subgroup (the two subgroup Gaussians with
shared covariance, equal priors). Classes thus rank by anomaly first, and
within a class the minority subgroup ranks first, matching the flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
# scipy and sklearn are imported where they are used: stages import every defense module, and most never run this one.
from cba.progress import tqdm

from cba.defenses.base import AttackRecord, Defense, check, detection_metrics
from cba.defenses.registry import DEFENSES
from cba.defenses.features import check_labels_source, class_groups, poison_group, robust_z, training_features
from cba.evaluate import extract_features

ADAPTATION = ("Encoder features; classes from k-means pseudo-labels (labels=kmeans) or training labels "
              "(labels=given); the global model (S_mu, S_eps) is fitted on a labelled held-out clean subsample "
              "of the test set.")


@dataclass
class GlobalModel:
    mean: np.ndarray  # centre of the clean representations
    s_mu: np.ndarray  # between-class (identity) covariance
    s_eps: np.ndarray  # within-class covariance, ridged

    @property
    def precision(self) -> np.ndarray:
        return np.linalg.inv(self.s_eps)

    def posterior_identity(self, x: np.ndarray) -> np.ndarray:
        """E[mu | x_1..n] for n centred samples of one identity: S_mu (n S_mu + S_eps)^-1 sum x."""
        return self.s_mu @ np.linalg.solve(len(x) * self.s_mu + self.s_eps, x.sum(0))


def _ridged(cov: np.ndarray, ridge: float) -> np.ndarray:
    return cov + ridge * max(np.trace(cov) / len(cov), 1e-12) * np.eye(len(cov))


def fit_global_model(features: np.ndarray, labels: np.ndarray, ridge: float = 0.01, max_iter: int = 100,
                     tol: float = 1e-6) -> GlobalModel:
    """EM of the two-component model (as in joint Bayesian face verification, which SCAn follows):
    E-step: each class's posterior identity; M-step: S_mu and S_eps from identities and residuals."""
    mean = features.mean(0)
    x = features - mean
    classes, index = np.unique(labels, return_inverse=True)
    counts = np.bincount(index).astype(np.float64)
    sums = np.stack([x[index == k].sum(0) for k in range(len(classes))])
    identity = (sums / counts[:, None])[index]
    s_mu, s_eps = np.cov(identity.T), np.cov((x - identity).T)
    for _ in range(max_iter):
        ridged = _ridged(s_eps, ridge)
        identities = np.stack([s_mu @ np.linalg.solve(n * s_mu + ridged, s) for n, s in zip(counts, sums)])
        identity = identities[index]
        new_mu, new_eps = np.cov(identity.T), np.cov((x - identity).T)
        change = np.linalg.norm(new_mu - s_mu) + np.linalg.norm(new_eps - s_eps)
        s_mu, s_eps = new_mu, new_eps
        if change <= tol * (np.linalg.norm(s_mu) + np.linalg.norm(s_eps)):
            break
    return GlobalModel(mean, s_mu, _ridged(s_eps, ridge))


def _mahalanobis(diff: np.ndarray, precision: np.ndarray) -> np.ndarray:
    return np.einsum("ij,jk,ik->i", diff, precision, diff)


def untangle(x: np.ndarray, model: GlobalModel, seed: int = 0) -> dict[str, Any]:
    """Split one class (centred by `model.mean`) into two subgroups and compute its J statistic.

    Returns J, the minority mask and each sample's posterior of minority membership."""
    from scipy.special import expit
    from sklearn.cluster import KMeans

    precision = model.precision
    eigval, eigvec = np.linalg.eigh(model.s_eps)
    whitened = x @ (eigvec / np.sqrt(eigval))  # Euclidean here = Mahalanobis under S_eps
    assignment = KMeans(2, n_init=10, random_state=seed).fit_predict(whitened)
    minority = int(np.argmin(np.bincount(assignment, minlength=2)))
    means = np.stack([x[assignment == g].mean(0) if (assignment == g).any() else x.mean(0) for g in (0, 1)])
    identity = model.posterior_identity(x)
    contribution = _mahalanobis(x - identity, precision) - _mahalanobis(x - means[assignment], precision)
    log_ratio = _mahalanobis(x - means[1 - minority], precision) - _mahalanobis(x - means[minority], precision)
    return {"j": float(contribution.mean()), "minority": assignment == minority,
            "minority_posterior": expit(np.clip(log_ratio / 2, -50, 50))}


def scan_scores(features: np.ndarray, groups: dict[int, np.ndarray], model: GlobalModel, threshold: float,
                seed: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Scores, flags and one row per class (size, J, anomaly index, flagged, minority size)."""
    x = features - model.mean
    splits = {c: untangle(x[idx], model, seed) if len(idx) >= 2 else None
              for c, idx in tqdm(groups.items(), desc="SCAn", unit="class", disable=not progress)}
    valid = [c for c, split in splits.items() if split is not None]
    anomaly = dict(zip(valid, robust_z(np.array([splits[c]["j"] for c in valid]))))
    scores = np.zeros(len(features))
    flagged = np.zeros(len(features), dtype=bool)
    rows = []
    for c, idx in groups.items():
        split = splits[c]
        if split is None:
            rows.append({"group": c, "size": int(len(idx)), "j": 0.0, "anomaly_index": 0.0, "flagged": False,
                         "minority_size": 0})
            continue
        is_flagged = bool(anomaly[c] > threshold)
        scores[idx] = anomaly[c] + split["minority_posterior"]
        flagged[idx[split["minority"]]] = is_flagged
        rows.append({"group": c, "size": int(len(idx)), "j": split["j"], "anomaly_index": float(anomaly[c]),
                     "flagged": is_flagged, "minority_size": int(split["minority"].sum())})
    return scores, flagged, rows


@DEFENSES.register("scan")
class SCAn(Defense):
    kind = "data_detection"

    def __init__(self, *, labels: str = "kmeans", clean_set_size: int = 200, threshold: float = float(np.exp(2)),
                 ridge: float = 0.01):
        check_labels_source(labels)
        check(isinstance(clean_set_size, int) and clean_set_size >= 20, "clean_set_size", clean_set_size,
              "an integer >= 20")
        check(threshold > 0, "threshold", threshold, "a positive anomaly index (the paper uses e^2 = 7.389)")
        check(ridge >= 0, "ridge", ridge, "a non-negative fraction of the mean eigenvalue")
        self.labels, self.clean_set_size, self.threshold, self.ridge = labels, clean_set_size, threshold, ridge

    def clean_set(self, record: AttackRecord) -> tuple[np.ndarray, np.ndarray]:
        """Features and true labels of the defender's clean set: held-out test images."""
        size = min(self.clean_set_size, len(record.test))
        pick = np.sort(np.random.default_rng(record.seed).choice(len(record.test), size, replace=False))
        return extract_features(record.encoder, record.test.images[pick]).double().numpy(), record.test.labels[pick]

    def run(self, record: AttackRecord, progress: bool = False) -> dict[str, Any]:
        features = training_features(record)
        groups = class_groups(record, self.labels, features)
        clean_features, clean_labels = self.clean_set(record)
        model = fit_global_model(clean_features, clean_labels, self.ridge)
        scores, flagged, rows = scan_scores(features, groups, model, self.threshold, record.seed, progress)
        poisoned = np.asarray(record.poisoned, dtype=bool)
        for row in rows:  # ground truth per class, for the report only
            idx = groups[row["group"]]
            row.update(positives=int(poisoned[idx].sum()), positives_flagged=int((flagged & poisoned)[idx].sum()))
        flagged_classes = [row["group"] for row in rows if row["flagged"]]
        target = record.target_class if self.labels == "given" else poison_group(groups, poisoned)
        out = detection_metrics(scores, poisoned, flagged)
        out.update(labels=self.labels, clean_set_size=int(len(clean_labels)), threshold=float(self.threshold),
                   flagged_classes=flagged_classes, target_group=int(target), target_flagged=target in flagged_classes,
                   per_class=rows, adaptation=ADAPTATION)
        return out
