"""One-line verdicts on the paper's three claims, computed from one run's metrics with stated thresholds.

A claim about a backdoor can only be judged where the backdoor took hold, so
every verdict first asks that. The thresholds are conventions, printed with
each verdict so a reader can apply their own.
"""

from __future__ import annotations

from typing import Any

TOOK_HOLD_ASR = 0.3  # an evaluation's ASR at least this ...
TOOK_HOLD_FACTOR = 3.0  # ... and this many times the natural target rate (no trigger) of the same classifier
SEPARABLE = 0.8  # AUROC at or above which a score separates poisoned from clean
REPAIR_ASR_FACTOR = 0.5  # a repair works if ASR falls to this fraction or less ...
REPAIR_ACC_DROP = 0.10  # ... while ACC falls by at most this much


def took_hold(finetune: dict[str, Any]) -> list[str]:
    """The evaluations (linear, knn) under which the backdoor took hold."""
    held = []
    for name in ("linear", "knn"):
        figures = finetune.get(name) or {}
        natural = figures.get("natural_rate") or 0.0  # older metrics lack it: the absolute bar alone then
        if figures.get("asr", 0.0) >= max(TOOK_HOLD_ASR, TOOK_HOLD_FACTOR * natural):
            held.append(name)
    return held


def claim_verdicts(finetune: dict[str, Any], analysis: dict[str, Any],
                   defenses: list[dict[str, Any]]) -> list[str]:
    """Markdown bullet lines: whether the backdoor took hold, then claims 1, 2 and 3."""
    held = took_hold(finetune)
    asr = ", ".join(f"{name} ASR {(finetune.get(name) or {}).get('asr', float('nan')):.3f} "
                    f"(natural rate {(finetune.get(name) or {}).get('natural_rate', float('nan')):.3f})" for name in ("linear", "knn"))
    rule = f"ASR ≥ {TOOK_HOLD_ASR} and ≥ {TOOK_HOLD_FACTOR:g}× the natural rate: non-target images sent to the target without the trigger"
    if not held:
        return [f"- **The backdoor did not take hold** ({asr}; rule: {rule}). The claims below cannot be judged on this run, "
                "and the defense rows measure a backdoor that is not there."]
    lines = [f"- **The backdoor took hold** under {' and '.join(held)} evaluation ({asr}; rule: {rule})."]
    dynamics, features = analysis.get("dynamics") or {}, analysis.get("entanglement") or {}
    loss_auroc, early, clean = dynamics.get("max_loss_auroc"), dynamics.get("backdoor_epoch"), dynamics.get("clean_epoch")
    if loss_auroc is not None:
        entangled = loss_auroc < SEPARABLE
        order = ("" if early is None or clean is None else
                 f"; the kNN backdoor passed 50% at epoch {early}, the clean task reached 90% of its final kNN ACC at epoch {clean}")
        lines.append(f"- **Claim 1, entangled learning: {'holds' if entangled else 'does not hold'}.** The per-sample loss "
                     f"separates poisoned from clean samples with AUROC {loss_auroc:.3f} at best "
                     f"({'below' if entangled else 'at or above'} {SEPARABLE}){order}.")
    separability = features.get("separability_auroc")
    if separability is not None:
        entangled = separability < SEPARABLE
        lines.append(f"- **Claim 2, entangled features: {'holds' if entangled else 'does not hold'}.** A linear classifier "
                     f"tells poisoned from clean target-class features with AUROC {separability:.3f} "
                     f"({'below' if entangled else 'at or above'} {SEPARABLE}); silhouette {features.get('silhouette', float('nan')):.3f}.")
    worked = [d["defense"] for d in defenses if _defense_worked(d)]
    verdict = "holds" if not worked else f"does not hold for {', '.join(worked)}"
    lines.append(f"- **Claim 3, defenses fail: {verdict}.** A detection defense works if its own decision flags the poisoned "
                 f"data with TPR ≥ {SEPARABLE} at FPR ≤ 0.2 or flags the target class; a repair works if ASR falls to "
                 f"{REPAIR_ASR_FACTOR:g}× or less while ACC drops by at most {REPAIR_ACC_DROP:g}.")
    return lines


def _defense_worked(result: dict[str, Any]) -> bool:
    if result.get("target_flagged"):
        return True
    if result.get("tpr") is not None and result.get("fpr") is not None and result["tpr"] >= SEPARABLE and result["fpr"] <= 0.2:
        return True
    before, after = result.get("asr_before"), result.get("asr_after")
    if before and after is not None and after <= REPAIR_ASR_FACTOR * before:
        return (result.get("acc_before", 0.0) - result.get("acc_after", 0.0)) <= REPAIR_ACC_DROP
    return False
