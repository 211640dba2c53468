"""The markdown report: params, metrics tables, trigger preview, learning curves.

Plain functions from already-loaded metrics to markdown text and PNGs; the
report stage only gathers the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from cba.io import write_png  # noqa: E402


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "–" if value is None else str(value)


def markdown_table(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    rows = list(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def plot_learning_curves(loss: pd.DataFrame, knn: pd.DataFrame, path: Path) -> None:
    """Training loss, and kNN ACC/ASR during pretraining, side by side."""
    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(loss["epoch"], loss["loss"], marker=".")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Pretraining loss")
    if "knn_acc" in knn:
        ax_knn.plot(knn["epoch"], knn["knn_acc"], marker="o", label="kNN ACC (clean test)")
        ax_knn.plot(knn["epoch"], knn["knn_asr"], marker="s", label="kNN ASR (triggered)")
    ax_knn.set(xlabel="epoch", ylabel="rate", ylim=(0, 1), title="Backdoor and clean task during pretraining")
    ax_knn.legend(loc="lower right")
    for ax in (ax_loss, ax_knn):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_png(path, fig, dpi=110)
    plt.close(fig)


def params_block(params: dict[str, Any]) -> str:
    return "```yaml\n" + yaml.safe_dump(params, sort_keys=False).rstrip() + "\n```"


def attack_summary(poison: dict, pretrain: dict, finetune: dict) -> str:
    def row(label: str, figures: dict) -> dict:
        return {"evaluation": label, "ACC": figures.get("acc"), "ASR": figures.get("asr"),
                "natural rate": figures.get("natural_rate"), "RA": figures.get("robust_acc")}

    reference = finetune.get("reference") or {}
    rows = [row("linear probe (converged)", finetune.get("linear", {})), row("kNN (k=200)", finetune.get("knn", {})),
            *(row(f"{label}, reference victim (no poisons)", reference[name])
              for name, label in (("linear", "linear probe"), ("knn", "kNN")) if reference.get(name)),
            {"evaluation": "kNN, randomly initialised encoder", "ACC": pretrain.get("random_init_knn_acc"),
             "ASR": pretrain.get("random_init_knn_asr")}]
    head = (f"Attack: **{poison.get('trigger')}** trigger, {poison.get('mode')}, {poison.get('poisoned')} of "
            f"{poison.get('train_size')} training images poisoned, target class {poison.get('target_class')}. "
            f"Pretraining: **{pretrain.get('method')}** on {pretrain.get('backbone')} (width {pretrain.get('width')}), "
            f"{pretrain.get('epochs')} epochs, augmentation parameters drawn **{pretrain.get('augmentation_protocol')}**, "
            f"{fmt(pretrain.get('seconds'))} s on {pretrain.get('env', {}).get('device')}.")
    return (head + "\n\n" + markdown_table(rows, ["evaluation", "ACC", "ASR", "natural rate", "RA"])
            + "\n\n*Natural rate*: non-target test images sent to the target without the trigger (the floor ASR must "
            "clear). *RA* (robust accuracy): triggered images still given their true class."
            + landing_table(finetune, poison.get("classes") or []) + readout_sentence(finetune.get("readout") or {}))


def landing_table(finetune: dict, classes: list[str]) -> str:
    """Where the triggered non-target test images land, per classifier: one row of counts per class."""
    rows = [{"classifier": name, **dict(zip(classes or map(str, range(len(counts))), counts))}
            for name in ("linear", "knn") if (counts := (finetune.get(name) or {}).get("landing"))]
    if not rows:
        return ""
    columns = ["classifier", *[key for key in rows[0] if key != "classifier"]]
    return "\n\nWhere the triggered images land (counts per predicted class):\n\n" + markdown_table(rows, columns)


def readout_sentence(readout: dict) -> str:
    """One paragraph on how the linear probe reads the trigger feature (`cba.analysis.readout`)."""
    if not readout.get("logit_gain"):
        return ""
    gains = sorted(readout["logit_gain"].items(), key=lambda item: -item[1])[:3]
    return ("\n\nHow the probe reads the trigger: the test-time shift the trigger causes points along the poisons' "
            f"own feature (cosine {fmt(readout.get('shift_alignment'))}, at {fmt(readout.get('shift_over_offset'))} of "
            f"its length); the probe's logits gain most for " + ", ".join(f"{name} ({g:+.2f})" for name, g in gains)
            + f", so the target's margin over the strongest other class ({readout.get('strongest_other')}) is "
            f"{readout['target_margin']:+.2f}. A learned trigger feature with a negative margin sends triggered images "
            "towards the target's neighbourhood (kNN ASR) while the probe picks another class."
            + target_alignment_sentence(readout))


def target_alignment_sentence(readout: dict) -> str:
    """How much of the poisons' feature points at the target class: the part a kNN on clean images can read."""
    if readout.get("offset_target_alignment") is None:
        return ""
    return (f" The poisons' feature points at the target class with cosine {fmt(readout['offset_target_alignment'])} "
            f"(the test-time shift: {fmt(readout.get('shift_target_alignment'))}); a kNN on clean images reads only "
            "that part, since no clean image carries the rest.")


def _before_after(result: dict, key: str) -> str:
    before, after = result.get(f"{key}_before"), result.get(f"{key}_after")
    return "–" if before is None else f"{fmt(before)} → {fmt(after)}"


def defense_table(results: list[dict[str, Any]]) -> str:
    """One row per defense: detection quality for detectors, ACC/ASR before → after for repairs."""
    rows = []
    for r in sorted(results, key=lambda r: (r.get("kind", ""), r.get("defense", ""))):
        rows.append({
            "defense": r.get("defense"), "kind": r.get("kind"), "AUROC": r.get("auroc"), "TPR": r.get("tpr"),
            "FPR": r.get("fpr"), "precision": r.get("precision"),
            "target flagged": r.get("target_flagged"),
            "ACC before → after": _before_after(r, "acc"), "ASR before → after": _before_after(r, "asr"), "DER": r.get("der"),
        })
    columns = ["defense", "kind", "AUROC", "TPR", "FPR", "precision", "target flagged", "ACC before → after",
               "ASR before → after", "DER"]
    return markdown_table(rows, columns)


def bench_section(title: str, markdown: str) -> str:
    """A bench script's markdown output under a level-3 title, its own headings demoted below it."""
    lines = markdown.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]  # the bench's own title gives way to `title`
    body = "\n".join("##" + line if line.startswith("#") else line for line in lines).strip()  # "## x" -> "#### x"
    return f"### {title}\n\n{body}"


def analysis_section(analysis: dict[str, Any], figures: dict[str, str]) -> str:
    """Learning dynamics (claim 1) and feature entanglement (claim 2), with their figures."""
    dyn, ent = analysis.get("dynamics", {}), analysis.get("entanglement", {})
    rows = [
        {"measure": "epoch the backdoor is learned (kNN ASR > 50%)", "value": dyn.get("backdoor_epoch")},
        {"measure": "epoch the clean task is learned (kNN ACC ≥ 90% of final)", "value": dyn.get("clean_epoch")},
        {"measure": "largest loss AUROC, poisoned vs clean (0.5 = inseparable)", "value": dyn.get("max_loss_auroc")},
        {"measure": "feature separability AUROC, poisoned vs clean target (linear, CV)", "value": ent.get("separability_auroc")},
        {"measure": "silhouette, poisoned vs clean target", "value": ent.get("silhouette")},
        {"measure": "distance to target centroid / target spread", "value": ent.get("centroid_distance_ratio")},
    ]
    parts = [markdown_table(rows, ["measure", "value"])]
    parts += [f"![{title}]({path})" for title, path in figures.items()]
    return "\n\n".join(parts)


def trigger_summary(stealth: dict) -> str:
    """One line on how visible the trigger is (and what its optimisation reached, for a learned one)."""
    if not stealth:
        return "No stealth figures (metrics/trigger.json) were written for this trigger."
    line = (f"Visibility over test images, triggered against clean: L-inf {stealth['linf']:.1f}/255, mean L2 {stealth['l2']:.0f} (0-255 scale), "
            f"PSNR {stealth['psnr']:.1f} dB, SSIM {stealth['ssim']:.3f}.")
    if "final_objective" in stealth:
        line += f" Final trigger objective {stealth['final_objective']:.3f} (lower is better for the attacker)."
    if "test_linf" in stealth:
        s = stealth
        reads = [s[f"{pattern}_{model}_probe_hit_rate"]
                 for model in ("surrogate", "clean_copy") for pattern in ("test", "poison")]
        line += (" The test inputs carry a test-time pattern fitted after the poisons: "
                 f"L-inf {s['test_linf']:.1f}/255, mean L2 {s['test_l2']:.0f}, PSNR {s['test_psnr']:.1f} dB, "
                 f"SSIM {s['test_ssim']:.3f}; the attacker's poisoned surrogate reads it as the target {reads[0]:.3f} "
                 f"(the poison pattern {reads[1]:.3f}), its clean copy {reads[2]:.3f} ({reads[3]:.3f}).")
    return line
