"""Cross-check cba's activation clustering and spectral signatures against the Adversarial Robustness Toolbox.

A test oracle, not a replacement: cba keeps its own SSL-adapted versions. Both
sides see the same model and the same features (the encoder's output, which is
the layer ART analyses when handed the encoder as its classifier), and the same
training labels (`labels: given`, as in the papers):

- spectral signatures: ART's per-class score (`spectral_signature_scores`) and
  removal decision (`detect_poison`, the same expected poison rate and factor)
  against cba's `spectral`;
- activation clustering: ART's `ActivationDefence` (2-means on FastICA to 10
  dimensions, the smaller cluster is poison) against cba's
  `activation_clustering` (the same reduction and clustering, size rule at 0.5).

ART's AC returns a decision only, so its AUROC is that of the binary flags
((TPR + 1 − FPR) / 2); cba's is given both ways. Spectral AUROCs pool the
per-class scores over all samples; ART's raw scores are on each class's own
scale and cba's are robust z-scores, so pooled AUROCs may differ where the
per-class ranking agrees: the table also gives the AUROC inside the target class.

    python bench/art_crosscheck.py            # the supervised BadNets model of the test suite, about 1 min
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from cba.defenses.activation_clustering import cluster_classes
from cba.record import AttackRecord
from cba.defenses.features import class_groups, training_features
from cba.defenses.spectral import spectral_scores
from cba.errors import BenchParser, run_script


def art_classifier(record: AttackRecord):
    from art.estimators.classification import PyTorchClassifier

    # The encoder alone: ART analyses its last layer, which is then the feature layer cba's defenses use.
    model = torch.nn.Sequential(record.encoder.eval())
    size = record.train.images.shape[1]
    return PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, size, size),
                             nb_classes=record.num_classes, clip_values=(0.0, 1.0), device_type="cpu")


def crosscheck(record: AttackRecord, expected_rate: float = 0.05, removal_factor: float = 1.5,
               repeats: int = 5) -> list[dict[str, Any]]:
    """One row per defense: cba's and ART's AUROC, decision TPR/FPR, and their agreement on the flagged set."""
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense

    poisoned = np.asarray(record.poisoned, dtype=bool)
    labels = np.asarray(record.train.labels)
    target = labels == record.target_class
    x = record.train.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    classifier = art_classifier(record)
    features = training_features(record)
    groups = class_groups(record, "given", features)

    # Spectral signatures: scores per class on the same features, and each side's own removal decision.
    cba_scores, cba_flags = spectral_scores(features, groups, expected_rate * removal_factor)
    art_scores = np.zeros(len(features))
    for idx in groups.values():
        art_scores[idx] = SpectralSignatureDefense.spectral_signature_scores(features[idx]).ravel()
    _, clean = SpectralSignatureDefense(classifier, x, labels, expected_pp_poison=expected_rate, batch_size=256,
                                        eps_multiplier=removal_factor).detect_poison()
    rows = [_row("spectral", cba_scores, art_scores, cba_flags, np.asarray(clean) == 0, poisoned, target)]

    # Activation clustering: FastICA to 10 dimensions, 2-means per class, the smaller cluster is poison. (ART's
    # "relative-size" rule, cba's default size_threshold 0.35, raises a ValueError in ART 1.20.1 with this numpy;
    # "smaller" is cba's size rule at threshold 0.5.)
    cba_ac, cba_flags, _ = cluster_classes(features, groups, reduce="ica", components=10, criterion="size",
                                           size_threshold=0.5, silhouette_threshold=0.15, seed=record.seed)
    # ART seeds neither FastICA nor its single-start k-means: repeat it under several global seeds.
    for seed in range(repeats):
        np.random.seed(seed)
        art_ac = ActivationDefence(classifier, x, np.eye(record.num_classes, dtype=np.float32)[labels])
        _, clean = art_ac.detect_poison(nb_clusters=2, nb_dims=10, reduce="FastICA", cluster_analysis="smaller")
        art_flags = np.asarray(clean) == 0
        rows.append({**_row("activation_clustering", cba_ac, art_flags.astype(float), cba_flags, art_flags, poisoned,
                            target), "art_seed": seed})
    return rows


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    return float(roc_auc_score(positive, scores)) if positive.any() and (~positive).any() else float("nan")


def _row(name: str, cba_scores: np.ndarray, art_scores: np.ndarray, cba_flags: np.ndarray, art_flags: np.ndarray,
         positive: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    def rates(flags: np.ndarray) -> tuple[float, float]:
        return float(flags[positive].mean()), float(flags[~positive].mean())

    (cba_tpr, cba_fpr), (art_tpr, art_fpr) = rates(cba_flags), rates(art_flags)
    cba_auroc, art_auroc = _auroc(cba_scores, positive), _auroc(art_scores, positive)
    return {"defense": name, "cba_auroc": cba_auroc, "art_auroc": art_auroc, "auroc_gap": abs(cba_auroc - art_auroc),
            "cba_target_class_auroc": _auroc(cba_scores[target], positive[target]),
            "art_target_class_auroc": _auroc(art_scores[target], positive[target]),
            "cba_tpr": cba_tpr, "cba_fpr": cba_fpr, "art_tpr": art_tpr, "art_fpr": art_fpr,
            "cba_decision_auroc": (cba_tpr + 1 - cba_fpr) / 2, "art_decision_auroc": (art_tpr + 1 - art_fpr) / 2,
            "flag_agreement": float((cba_flags == art_flags).mean())}


def main() -> None:
    parser = BenchParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    from cba.attack import run_attack
    from cba.data.synthetic import generate
    from cba.triggers import build_trigger

    train, test = generate(args.train_size, seed=11), generate(500, seed=12)
    record = run_attack(train, test, build_trigger("patch", {"size": 4}, seed=0), method="supervised",
                        mode="dirty_label", poison_rate=0.05, target_class=0, width=16, epochs=args.epochs,
                        batch_size=64, lr=0.1, seed=0)
    for row in crosscheck(record):
        print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    run_script(main)
