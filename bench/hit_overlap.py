"""Which triggered images the backdoor adds: the poisoned victim's hits beside the reference victim's, image by image.

The 3x rule compares two ASRs: the poisoned victim's (`cba pretrain`) and the
reference victim's (`cba reference`: the same recipe, seed and data without
poisons), both reading the same triggered test images. Two mechanisms give
the poisoned victim its larger ASR, and they leave different traces image by
image:

- **amplification**: poisoning strengthens what any encoder of this recipe
  already reads in the pattern. The images it adds are those the reference
  victim nearly sent to the target (a high target margin there), its hits
  are almost all kept, and the two victims' per-image margins correlate;
- **a backdoor of its own**: the poisoned victim sends images to the target
  whatever the reference victim made of them, so the hits it adds come from
  every band of the reference's margin.

For each reader (the converged linear probe and the weighted kNN, fitted on
the clean labelled set exactly as `cba finetune` fits them, so the ASRs are
the pipeline's to the last digit) the bench prints how the two victims' hit
sets overlap, the Spearman correlation of their per-image target margins
(probe: the target's logit minus the largest other; kNN: the target's share
of the vote minus the largest other share), and the poisoned victim's ASR
over the images the reference victim misses, in five bands of the
reference's margin, lowest first.

It also splits what the trigger does to each image's margin (its *shift*:
the margin of the triggered image minus that of the clean one) into the two
parts: a least-squares line, poisoned shift = slope x reference shift +
push. The reference's mean shift is the pattern's own *pull*, which any
encoder of this recipe reads; a slope near 1 says the poisoned victim reads
that pull image by image as the reference does, and the *push* is what the
poisons add to every image on average, the backdoor proper (the *scatter*,
the residuals' standard deviation, says how far single images stray from
the line). Amplification would show as a slope above 1 and no push.

Run in the repository root after `dvc repro` (seconds), with the thread
count the pipeline ran with (the probe's float sums, and with them single
readings, change with it). `--rates` reads victims poisoned at other rates
with the pipeline's trigger instead, each trained as `cba pretrain` trains
one (or loaded from `--cache`), against the same reference victim;
`--trigger-params` first refits the pattern with a change to params.yaml's
trigger params (as `cba trigger` fits it; minutes) for those victims:

    python bench/hit_overlap.py
    OMP_NUM_THREADS=2 python bench/hit_overlap.py --rates 0.01 0.05 0.098 --cache .cache/victims
    OMP_NUM_THREADS=2 python bench/hit_overlap.py --rates 0.05 --trigger-params '{w_neutral: 50}' --cache .cache/victims
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cba.attack import reader_options, run_attack, victim_settings
from cba.env import command_line, environment, results_header
from cba.errors import BenchParser, run_script
from cba.evaluate import extract_features, fit_linear_probe, knn_votes
from cba.io import write_json
from cba.models.io import load_encoder
from cba.poison import triggered_test_set, validate_poison
from cba.readings import pipeline_params, pipeline_sets
from cba.triggers import build_trigger, load_trigger
from cba.triggers.fitting import fit_trigger

NEEDED = ("params.yaml", "data/trigger", "data/pretrain/encoder.safetensors", "data/reference/encoder.safetensors",
          "data/poisoned/clean_train.safetensors", "data/poisoned/test.safetensors")
READERS = ("linear", "knn")
BANDS = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("."), help="a repository where `dvc repro` has run")
    parser.add_argument("--rates", type=float, nargs="+", default=None,
                        help="read victims poisoned at these rates (the pipeline's trigger and recipe) instead of "
                             "the pipeline's own")
    parser.add_argument("--trigger-params", type=yaml.safe_load, default=None,
                        help="a YAML dict of changes to params.yaml's trigger params: the pattern is refitted with "
                             "them (needs --rates: the pipeline's victim carries the pipeline's pattern)")
    parser.add_argument("--cache", type=Path, default=None, help="a folder of trained victims (cba.victim_cache)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (the victims' training)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/hit_overlap.json"))
    args = parser.parse_args(argv)
    missing = [p for p in NEEDED if not (args.root / p).exists()]
    if missing:
        parser.error(f"--root {args.root}: no {missing[0]}; run `dvc repro` there first")
    if args.trigger_params is not None and (not isinstance(args.trigger_params, dict) or args.rates is None):
        parser.error(f"--trigger-params {args.trigger_params!r}: give a YAML mapping such as '{{w_neutral: 5}}', "
                     "with --rates")
    return args


def margin(scores: torch.Tensor, target: int) -> np.ndarray:
    """The target's score minus the largest other score, per row: above 0 exactly where the target wins."""
    others = scores.clone()
    others[:, target] = -torch.inf
    return (scores[:, target] - others.max(1).values).numpy()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def victim_margins(encoder: torch.nn.Module, clean, images: dict[str, np.ndarray], target: int,
                   options: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Per reader, fitted as `cba finetune` fits it, and per image set: each image's target margin (the probe's
    logits; the kNN's vote shares)."""
    bank = extract_features(encoder, clean.images)
    labels = torch.as_tensor(clean.labels).long()
    probe = fit_linear_probe(bank, labels, clean.num_classes, seed=options["seed"], **options["probe_options"]).probe
    out: dict[str, dict[str, np.ndarray]] = {reader: {} for reader in READERS}
    for name, batch in images.items():
        feats = extract_features(encoder, batch)
        votes = knn_votes(bank, labels, feats, clean.num_classes, options["k"], options["temperature"])
        with torch.no_grad():
            out["linear"][name] = margin(probe(feats), target)
        out["knn"][name] = margin(votes / votes.sum(1, keepdim=True), target)
    return out


def shift(margins: dict[str, np.ndarray]) -> np.ndarray:
    """What the trigger does to each image's target margin: triggered minus clean."""
    return margins["triggered"] - margins["clean"]


def compare(poisoned: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """How the poisoned victim's hits (triggered margin > 0) sit beside the reference victim's, and the split of
    its shifts into the reference's pull and a push of its own."""
    p, r = poisoned["triggered"], reference["triggered"]
    hit_p, hit_r = p > 0, r > 0
    missed = ~hit_r
    # Bands of the reference margin over the images it misses: band 1 lowest (furthest from the target).
    edges = np.quantile(r[missed], np.linspace(0, 1, BANDS + 1)[1:-1]) if missed.any() else []
    band = np.digitize(r, edges)
    shift_p, shift_r = shift(poisoned), shift(reference)
    slope, push = np.polyfit(shift_r, shift_p, 1)
    return {
        "n": int(len(p)), "asr_poisoned": float(hit_p.mean()), "asr_reference": float(hit_r.mean()),
        "both": int((hit_p & hit_r).sum()), "poisoned_only": int((hit_p & missed).sum()),
        "reference_only": int((~hit_p & hit_r).sum()),
        "kept": float(hit_p[hit_r].mean()) if hit_r.any() else float("nan"),
        "added": float(hit_p[missed].mean()) if missed.any() else float("nan"),
        "spearman": spearman(p, r),
        "added_by_band": [float(hit_p[missed & (band == b)].mean()) for b in range(BANDS)] if missed.any() else [],
        "pull": float(shift_r.mean()), "poisoned_shift": float(shift_p.mean()), "slope": float(slope),
        "push": float(push), "shift_correlation": float(np.corrcoef(shift_p, shift_r)[0, 1]),
        # how far single images scatter around the line: the push is a constant only on average
        "residual_std": float((shift_p - slope * shift_r - push).std()),
        # where the clean images start from: how far, on average, each victim reads them from the target
        "clean_margin_poisoned": float(poisoned["clean"].mean()), "clean_margin_reference": float(reference["clean"].mean()),
    }


def by_class(poisoned: dict[str, np.ndarray], reference: dict[str, np.ndarray], labels: np.ndarray,
             classes: list[str], slope: float) -> dict[str, dict[str, float]]:
    """Per true class of the triggered images: both victims' ASR, the push that class gets (its mean poisoned
    shift less slope x its reference shift: what the poisons add to that class beyond the pull), its pull (its
    mean reference shift) and where its clean images start on the poisoned victim (their mean margin)."""
    shift_p, shift_r = shift(poisoned), shift(reference)
    out = {}
    for c in np.unique(labels):
        rows = labels == c
        out[classes[c]] = {"poisoned": float((poisoned["triggered"][rows] > 0).mean()),
                           "reference": float((reference["triggered"][rows] > 0).mean()),
                           "push": float((shift_p[rows] - slope * shift_r[rows]).mean()),
                           "clean_margin": float(poisoned["clean"][rows].mean()), "pull": float(shift_r[rows].mean())}
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| victim | reader | ASR poisoned / reference | hit by both / poisoned only / reference only "
             "| reference's hits kept | ASR over the reference's misses, by its margin, lowest fifth first "
             "| Spearman of margins | clean margin poisoned / reference | pull (reference's mean shift) "
             "| poisoned shift = slope x reference's + push |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row["compare"]
        bands = ", ".join(f"{x:.3f}" for x in r["added_by_band"])
        lines.append(f"| {row['victim']} | {row['reader']} | {r['asr_poisoned']:.3f} / {r['asr_reference']:.3f} "
                     f"| {r['both']} / {r['poisoned_only']} / {r['reference_only']} | {r['kept']:.3f} "
                     f"| {r['added']:.3f} ({bands}) | {r['spearman']:.3f} "
                     f"| {r['clean_margin_poisoned']:.3g} / {r['clean_margin_reference']:.3g} | {r['pull']:.3g} "
                     f"| {r['slope']:.2f} x + {r['push']:.3g} (corr {r['shift_correlation']:.2f}, scatter {r['residual_std']:.2g}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    root = args.root
    params = pipeline_params(root)
    seed, target = int(params.get("seed", 0)), int(params.get("target_class", 0))
    options = reader_options(params)
    trigger = load_trigger(root / "data/trigger")
    clean, test = pipeline_sets(root)
    for rate in args.rates or []:  # bad input fails here, before any training
        validate_poison(clean.labels, clean.num_classes, rate, target, "clean_label")
    if args.trigger_params is not None:
        section = params.get("trigger") or {}
        trigger = build_trigger(section.get("name", "optimized"), {**(section.get("params") or {}), **args.trigger_params},
                                seed=seed, image_size=clean.images.shape[1])
        fit_trigger(trigger, clean.images, clean.labels, target, seed, progress=not args.quiet)
    triggered = triggered_test_set(test, trigger, target, seed)
    images = {"triggered": triggered.images, "clean": test.images[test.labels != target]}  # the same images, in order
    reference = victim_margins(load_encoder(root / "data/reference/encoder.safetensors"), clean, images, target, options)
    if args.rates is None:
        victims = {f"the pipeline's ({float(params.get('poison_rate', 0.05)):g})":
                   lambda: load_encoder(root / "data/pretrain/encoder.safetensors")}
    else:
        # The stage outputs hold the pipeline's clean splits: the victims train on them, as `cba pretrain` does.
        settings = {**victim_settings(params), "progress": not args.quiet}
        victims = {f"rate {rate:g}": (lambda rate=rate: run_attack(
            clean, test, trigger, mode="clean_label", poison_rate=rate, cache=args.cache, **settings).encoder)
            for rate in args.rates}
    rows = []
    for name, encoder in victims.items():
        poisoned = victim_margins(encoder(), clean, images, target, options)
        for reader in READERS:
            compared = compare(poisoned[reader], reference[reader])
            rows.append({"victim": name, "reader": reader, "compare": compared,
                         "by_class": by_class(poisoned[reader], reference[reader], triggered.labels, test.classes,
                                              compared["slope"])})
    command, data = command_line(argv), (params.get("data") or {}).get("name", "synthetic")
    env = environment(torch.device("cpu"))
    write_json(args.out, {"rows": rows, "_run": {"command": command, "env": env,
                                                 "trigger": trigger.name, "trigger_change": args.trigger_params,
                                                 "target_class": target, "seed": seed, "data": data}})
    text = table(rows)
    classes = list(rows[0]["by_class"])
    class_lines = ["| victim | reader | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
    class_lines += [f"| {row['victim']} | {row['reader']} | " + " | ".join(
        f"{row['by_class'][c]['poisoned']:.2f} / {row['by_class'][c]['reference']:.2f} "
        f"({row['by_class'][c]['pull']:.2g} → {row['by_class'][c]['push']:.2g})"
        for c in classes) + " |"
        for row in rows]
    args.out.with_suffix(".md").write_text(
        results_header("Which triggered images the backdoor adds", command, env)
        + f"Data: {data}; target "
        f"{test.classes[target]}; {len(triggered.labels)} triggered non-target test images; margins in logits "
        f"(linear) and vote shares (kNN).\n\n{text}\n\nASR per true class of the triggered image, poisoned / "
        f"reference (that class's pull → push):\n\n" + "\n".join(class_lines) + "\n")
    print(text)
    print("\n".join(class_lines))
    return {"rows": rows}


if __name__ == "__main__":
    run_script(main)
