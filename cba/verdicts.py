"""One-line verdicts on the paper's three claims, computed from one run's metrics with stated thresholds.

A claim about a backdoor can only be judged where the backdoor took hold, so
every verdict first asks that. The thresholds are conventions, printed with
each verdict so a reader can apply their own.
"""

from __future__ import annotations

from typing import Any

TOOK_HOLD_ASR = 0.3  # an evaluation's ASR at least this ...
TOOK_HOLD_FACTOR = 3.0  # ... and this many times the natural target rate (no trigger) of the same classifier,
# and this many times the ASR the same trigger reaches on the reference victim (the same pretraining, no poisons)
SEPARABLE = 0.8  # AUROC at or above which a score separates poisoned from clean
REPAIR_ASR_FACTOR = 0.5  # a repair works if ASR falls to this fraction or less ...
REPAIR_ACC_DROP = 0.10  # ... while ACC falls by at most this much
EVALUATIONS = ("linear", "knn")


def backdoor_status(finetune: dict[str, Any], name: str) -> str:
    """How evaluation `name` reads the trigger: `held` (every bar met), `adversarial` (the ASR and natural-rate bars
    met, but the reference victim reads the trigger as the target so often that poisoning adds less than
    TOOK_HOLD_FACTOR times) or `none`."""
    figures = finetune.get(name) or {}
    asr = figures.get("asr", 0.0)
    natural = figures.get("natural_rate") or 0.0  # older metrics lack it: the absolute bar alone then
    if asr < max(TOOK_HOLD_ASR, TOOK_HOLD_FACTOR * natural):
        return "none"
    reference = ((finetune.get("reference") or {}).get(name) or {}).get("asr")
    return "adversarial" if reference is not None and asr < TOOK_HOLD_FACTOR * reference else "held"


ODDS_FLOOR = 1e-3  # rates are held this far from 0 and 1 (a share of about 1800 triggered images)


def odds(p: float, floor: float = ODDS_FLOOR) -> float:
    """p / (1 - p), with p held within [floor, 1 - floor] so that a rate of 0 or 1 stays finite."""
    p = min(max(p, floor), 1 - floor)
    return p / (1 - p)


def odds_needed(reference: float, natural: float) -> float:
    """The least factor by which poisoning must multiply the odds of the reference victim's reading (the pull) for
    an evaluation to meet every bar from that pull: inf where 3x the pull or the natural rate is 1 or more.

    A poison that adds the same margin to every triggered image multiplies those odds by one factor, whatever the
    pull (docs/results/pull-and-push.md), so this says how far a partly adversarial trigger is from a backdoor."""
    goal = max(TOOK_HOLD_ASR, TOOK_HOLD_FACTOR * reference, TOOK_HOLD_FACTOR * natural)
    return float("inf") if goal >= 1 else odds(goal) / odds(reference)


def _odds_sentence(finetune: dict[str, Any], names: list[str]) -> str:
    """How much poisoning multiplied the odds of each reference reading, beside what every bar needs."""
    parts = []
    for name in names:
        figures, reference = finetune[name], finetune["reference"][name]
        got = odds(figures["asr"]) / odds(reference["asr"])
        needed = odds_needed(reference["asr"], figures.get("natural_rate") or 0.0)
        pull = f"from a pull of {reference['asr']:.3f}"
        need = (f"every bar needs {needed:.2f} {pull}" if needed < float("inf") else
                f"no multiplier meets every bar {pull}: 3× the pull or the natural rate is 1 or more")
        parts.append(f"{got:.2f} under {name} ({need})")
    return f"Poisoning multiplied the odds of the reference victim's reading by {' and '.join(parts)}."


def took_hold(finetune: dict[str, Any]) -> list[str]:
    """The evaluations (linear, knn) under which the backdoor took hold."""
    return [name for name in EVALUATIONS if backdoor_status(finetune, name) == "held"]


def _figures(finetune: dict[str, Any], name: str) -> str:
    figures, reference = finetune.get(name) or {}, (finetune.get("reference") or {}).get(name) or {}
    nan = float("nan")
    text = f"{name} ASR {figures.get('asr', nan):.3f} (natural rate {figures.get('natural_rate', nan):.3f}"
    if reference:
        text += (f"; reference victim {reference.get('asr', nan):.3f}, ACC {figures.get('acc', nan):.3f} "
                 f"against its {reference.get('acc', nan):.3f}")
    return text + ")"


def claim_verdicts(finetune: dict[str, Any], analysis: dict[str, Any],
                   defenses: list[dict[str, Any]]) -> list[str]:
    """Markdown bullet lines: whether the backdoor took hold, then claims 1, 2 and 3."""
    status = {name: backdoor_status(finetune, name) for name in EVALUATIONS}
    held = [name for name in EVALUATIONS if status[name] == "held"]
    partly = [name for name in EVALUATIONS if status[name] == "adversarial"]
    asr = ", ".join(_figures(finetune, name) for name in EVALUATIONS)
    rule = (f"ASR ≥ {TOOK_HOLD_ASR}, ≥ {TOOK_HOLD_FACTOR:g}× the natural rate (non-target images sent to the "
            f"target without the trigger) and ≥ {TOOK_HOLD_FACTOR:g}× the reference victim's ASR (the same "
            "pretraining without poisons, the same trigger)")
    if not held and not partly:
        return [f"- **The backdoor did not take hold** ({asr}; rule: {rule}). The claims below cannot be judged on "
                "this run, and the defense rows measure a backdoor that is not there."]
    if held:
        lines = [f"- **The backdoor took hold** under {' and '.join(held)} evaluation ({asr}; rule: {rule})."]
    else:
        lines = [f"- **The backdoor took hold only in part** ({asr}; rule: {rule})."]
    if partly:
        lines.append(f"- **Under {' and '.join(partly)} evaluation the trigger is partly an adversarial pattern**: the "
                     f"reference victim, which never saw a poison, reads it as the target too, and poisoning adds less "
                     f"than {TOOK_HOLD_FACTOR:g}× to that. {_odds_sentence(finetune, partly)} The claims below are "
                     "judged on this run all the same; read them as claims about a backdoor that is only partly one.")
    dynamics, features = analysis.get("dynamics") or {}, analysis.get("entanglement") or {}
    loss_auroc = dynamics.get("max_loss_auroc")
    early, clean = dynamics.get("backdoor_epoch"), dynamics.get("clean_epoch")
    if loss_auroc is not None:
        entangled = loss_auroc < SEPARABLE
        order = ("" if early is None or clean is None else
                 f"; the kNN backdoor passed 50% at epoch {early}, the clean task reached 90% of its final kNN ACC "
                 f"at epoch {clean}")
        lines.append(f"- **Claim 1, entangled learning: {'holds' if entangled else 'does not hold'}.** The per-sample "
                     f"loss separates poisoned from clean samples with AUROC {loss_auroc:.3f} at best "
                     f"({'below' if entangled else 'at or above'} {SEPARABLE}){order}.")
    separability = features.get("separability_auroc")
    if separability is not None:
        entangled = separability < SEPARABLE
        silhouette = features.get("silhouette", float("nan"))
        lines.append(f"- **Claim 2, entangled features: {'holds' if entangled else 'does not hold'}.** A linear "
                     f"classifier tells poisoned from clean target-class features with AUROC {separability:.3f} "
                     f"({'below' if entangled else 'at or above'} {SEPARABLE}); silhouette {silhouette:.3f}.")
    worked = [d["defense"] for d in defenses if _defense_worked(d)]
    verdict = "holds" if not worked else f"does not hold for {', '.join(worked)}"
    lines.append(f"- **Claim 3, defenses fail: {verdict}.** A detection defense works if its own decision flags the "
                 f"poisoned data with TPR ≥ {SEPARABLE} at FPR ≤ 0.2 or flags the target class; a repair works if ASR "
                 f"falls to {REPAIR_ASR_FACTOR:g}× or less while ACC drops by at most {REPAIR_ACC_DROP:g}.")
    return lines


def _defense_worked(result: dict[str, Any]) -> bool:
    if result.get("target_flagged"):
        return True
    tpr, fpr = result.get("tpr"), result.get("fpr")
    if tpr is not None and fpr is not None and tpr >= SEPARABLE and fpr <= 0.2:
        return True
    before, after = result.get("asr_before"), result.get("asr_after")
    if before and after is not None and after <= REPAIR_ASR_FACTOR * before:
        return (result.get("acc_before", 0.0) - result.get("acc_after", 0.0)) <= REPAIR_ACC_DROP
    return False
