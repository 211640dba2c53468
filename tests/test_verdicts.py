"""Claim verdicts: computed from the metrics, gated on whether the backdoor took hold."""

from __future__ import annotations

import math

from cba.verdicts import backdoor_status, claim_verdicts, odds, odds_needed, took_hold


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


def with_reference(figures: dict, linear_asr: float, knn_asr: float) -> dict:
    return {**figures, "reference": {"linear": {"acc": 0.68, "asr": linear_asr, "natural_rate": 0.01},
                                     "knn": {"acc": 0.5, "asr": knn_asr, "natural_rate": 0.01}}}


def test_asr_must_beat_the_reference_victims_reading_threefold():
    """The reference victim never saw a poison: what it reads as the target is the pattern's own doing."""
    figures = with_reference(finetune(0.6, 0.45, natural=0.01), linear_asr=0.3, knn_asr=0.1)
    assert took_hold(figures) == ["knn"]  # 0.6 < 3 x 0.3; 0.45 >= 3 x 0.1
    assert backdoor_status(figures, "linear") == "adversarial" and backdoor_status(figures, "knn") == "held"
    assert took_hold(with_reference(finetune(0.6, 0.45, natural=0.01), 0.19, 0.15)) == ["linear", "knn"]
    assert backdoor_status(with_reference(finetune(0.2, 0.45, natural=0.01), 0.01, 0.2), "linear") == "none"


def test_a_partly_adversarial_trigger_is_said_so_and_the_claims_carry_the_caveat():
    lines = claim_verdicts(with_reference(finetune(0.55, 0.48, natural=0.01), 0.31, 0.2), ANALYSIS, [])
    assert "took hold only in part" in lines[0] and "reference victim 0.310" in lines[0] and "ACC 0.700 against its 0.680" in lines[0]
    assert "Under linear and knn evaluation the trigger is partly an adversarial pattern" in lines[1]
    # odds(0.55) / odds(0.31) = 2.72; every bar from a pull of 0.31 needs 3 x 0.31 = 0.93: odds ratio 29.57
    assert ("by 2.72 under linear (every bar needs 29.57 from a pull of 0.310) and 3.69 under knn (every bar needs "
            "6.00 from a pull of 0.200)") in lines[1]
    assert "Claim 1" in lines[2] and "Claim 3" in lines[-1]
    lines = claim_verdicts(with_reference(finetune(0.9, 0.48, natural=0.01), 0.4, 0.2), ANALYSIS, [])
    assert "under linear (no multiplier meets every bar from a pull of 0.400: 3× the pull" in lines[1]  # 3 x 0.4 > 1
    lines = claim_verdicts(with_reference(finetune(0.55, 0.48, natural=0.01), 0.31, 0.1), ANALYSIS, [])
    assert "took hold** under knn" in lines[0] and "Under linear evaluation" in lines[1]
    lines = claim_verdicts(with_reference(finetune(0.1, 0.2, natural=0.01), 0.0, 0.0), ANALYSIS, [])
    assert len(lines) == 1 and "did not take hold" in lines[0]


def test_the_odds_multiplier_every_bar_needs_follows_the_pull():
    """From a pull p, ASR must reach max(0.3, 3p, 3 x natural rate): the odds must grow by odds(that) / odds(p)."""
    assert math.isclose(odds(0.25), 1 / 3) and math.isclose(odds(0.0), 1e-3 / (1 - 1e-3))
    assert math.isclose(odds_needed(0.1, 0.01), (0.3 / 0.7) / (0.1 / 0.9))  # the ASR bar binds: 3.86
    assert math.isclose(odds_needed(0.05, 0.01), (0.3 / 0.7) / (0.05 / 0.95))  # a smaller pull needs more: 8.14
    assert math.isclose(odds_needed(0.2, 0.01), 6.0)  # 3x binds: 0.6 from 0.2
    assert math.isclose(odds_needed(0.05, 0.2), (0.6 / 0.4) / (0.05 / 0.95))  # the natural rate binds
    assert odds_needed(0.34, 0.01) == math.inf  # 3 x 0.34 > 1: no multiplier meets the 3x rule
