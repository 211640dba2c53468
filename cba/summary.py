"""`metrics/summary.json`: the handful of figures that say what one run found, for `dvc exp show`.

The downstream classifier's ACC, ASR, natural target rate and robust accuracy,
the same for kNN, the same trigger's ACC and ASR on the reference victim
(`ref_*`: the same pretraining without poisons), and one figure per defense: a detection defense's AUROC, Neural
Cleanse's anomaly index of the true target, a repair's ASR after repair and its
DER. Keys are short so that a table of experiments stays narrow, and the
headline ones are capitalised (ACC, ASR, RA, kNN_ACC, ...) so that no other
metrics file has a key of the same name: `dvc exp show` then shows them
without a file-path prefix.
"""

from __future__ import annotations

from typing import Any

# Short column names for the longer defense names.
SHORT = {"activation_clustering": "ac", "neural_cleanse": "nc", "fine_pruning": "fp", "downstream_ft": "dft",
         "spectral": "ss"}


def defense_figures(result: dict[str, Any]) -> dict[str, float]:
    """The one or two figures that rate a defense, named `<short>_<figure>`."""
    name = SHORT.get(result.get("defense", ""), result.get("defense", "defense"))
    if result.get("kind") == "repair":
        return {f"{name}_asr": result.get("asr_after"), f"{name}_der": result.get("der")}
    if "target_anomaly_index" in result:
        return {f"{name}_index": result.get("target_anomaly_index")}
    out = {f"{name}_auroc": result.get("auroc")}
    if "asr_after" in result:  # ABL detects, then unlearns
        out[f"{name}_asr"] = result.get("asr_after")
    return out


def summary_figures(finetune: dict[str, Any], defenses: list[dict[str, Any]]) -> dict[str, float]:
    """Flat scalars; figures a run lacks are left out rather than written as null."""
    primary = finetune.get(finetune.get("primary", "linear")) or {}
    linear, knn = finetune.get("linear") or {}, finetune.get("knn") or {}
    figures: dict[str, Any] = {
        "ACC": primary.get("acc"), "ASR": primary.get("asr"),
        "natural": primary.get("natural_rate", linear.get("natural_rate")),
        "RA": primary.get("robust_acc", linear.get("robust_acc")),
        "kNN_ACC": knn.get("acc"), "kNN_ASR": knn.get("asr"), "kNN_natural": knn.get("natural_rate"),
    }
    # The same trigger read on the reference victim (no poisons): what the ASR above must exceed threefold.
    reference = finetune.get("reference") or {}
    reference_primary = reference.get(finetune.get("primary", "linear")) or {}
    figures.update({"ref_ACC": reference_primary.get("acc"), "ref_ASR": reference_primary.get("asr"),
                    "ref_kNN_ACC": (reference.get("knn") or {}).get("acc"),
                    "ref_kNN_ASR": (reference.get("knn") or {}).get("asr")})
    for result in defenses:
        figures.update(defense_figures(result))
    return {key: value for key, value in figures.items() if isinstance(value, (int, float)) and value == value}
