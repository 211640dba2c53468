"""Claim verdicts: computed from the metrics, gated on whether the backdoor took hold."""

from __future__ import annotations

from cba.verdicts import claim_verdicts, took_hold


def finetune(linear_asr: float, knn_asr: float, natural: float = 0.05) -> dict:
    return {"linear": {"acc": 0.7, "asr": linear_asr, "natural_rate": natural},
            "knn": {"acc": 0.5, "asr": knn_asr, "natural_rate": natural}}


ANALYSIS = {"dynamics": {"max_loss_auroc": 0.6, "backdoor_epoch": 5, "clean_epoch": 15},
            "entanglement": {"separability_auroc": 0.95, "silhouette": 0.2}}


def test_no_backdoor_means_no_claim_is_judged():
    lines = claim_verdicts(finetune(0.1, 0.2), ANALYSIS, [])
    assert len(lines) == 1 and "did not take hold" in lines[0] and "cannot be judged" in lines[0]


def test_asr_must_beat_the_natural_rate_threefold():
    assert took_hold(finetune(0.5, 0.5, natural=0.2)) == []  # 0.5 < 3 x 0.2
    assert took_hold(finetune(0.5, 0.35, natural=0.1)) == ["linear", "knn"]
    assert took_hold(finetune(0.2, 0.35, natural=0.1)) == ["knn"]


def test_each_claim_follows_its_figure():
    lines = claim_verdicts(finetune(0.6, 0.4), ANALYSIS, [])
    assert "took hold** under linear and knn" in lines[0]
    assert "Claim 1, entangled learning: holds" in lines[1] and "epoch 5" in lines[1]
    assert "Claim 2, entangled features: does not hold" in lines[2] and "0.950" in lines[2]
    assert "Claim 3, defenses fail: holds" in lines[3]


def test_a_defense_that_works_breaks_claim_3():
    defenses = [{"defense": "strip", "tpr": 0.9, "fpr": 0.1},
                {"defense": "neural_cleanse", "target_flagged": False},
                {"defense": "dbd", "asr_before": 0.6, "asr_after": 0.1, "acc_before": 0.7, "acc_after": 0.65},
                {"defense": "fine_pruning", "asr_before": 0.6, "asr_after": 0.1, "acc_before": 0.7, "acc_after": 0.3}]
    line = claim_verdicts(finetune(0.6, 0.4), ANALYSIS, defenses)[-1]
    assert "does not hold for strip, dbd" in line and "fine_pruning" not in line
