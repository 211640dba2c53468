"""How the backdoor and the pattern's own pull grow with the trigger's amplitude at test time, on the pipeline's outputs.

The victim learned the trigger at the amplitude the poisons carry. At test
time an attacker may add the same pattern scaled by s (Narcissus, Zeng et
al. 2022, magnifies its trigger 3x at test time). Both readings grow with s:
the poisoned victim's (the backdoor plus the pattern's own pull) and the
reference victim's (`cba reference`: the same recipe without poisons, so the
pull alone). Which grows faster says what the victim learned:

- a direction of its own, tied to the target by poisoning: the poisoned
  reading rises faster, and the ratio to the reference grows with s;
- no more than what any encoder of this recipe reads: both rise together,
  and the ratio stays or falls.

For each scale the pattern is s times the learned one (L-inf s x linf on the
0-255 scale), added and clipped to the image range as the trigger adds it.
Both victims are read the pipeline's way (`cba finetune`): a weighted kNN
and the converged linear probe on the clean labelled set, fitted once per
encoder. Run in the repository root after `dvc repro` (the trigger must be
an additive pattern, `optimized`):

    python bench/trigger_scale.py --scales 0.5 1 1.5 2 3
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from cba.attack import reader_options
from cba.env import command_line, environment, results_header
from cba.errors import BenchParser, run_script
from cba.evaluate import read_triggered_sets
from cba.io import write_json
from cba.models.io import load_encoder
from cba.poison import triggered_test_set
from cba.readings import pipeline_params, pipeline_sets, scaled_pattern
from cba.triggers import load_trigger

NEEDED = ("params.yaml", "data/trigger", "data/pretrain/encoder.safetensors", "data/reference/encoder.safetensors",
          "data/poisoned/clean_train.safetensors", "data/poisoned/test.safetensors")
VICTIMS = {"poisoned": "data/pretrain/encoder.safetensors", "reference": "data/reference/encoder.safetensors"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("."), help="a repository where `dvc repro` has run")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0],
                        help="test-time multiples of the learned pattern")
    parser.add_argument("--out", type=Path, default=Path("bench/results/trigger_scale.json"))
    args = parser.parse_args(argv)
    bad = [s for s in args.scales if not s > 0]
    if bad:
        parser.error(f"--scales {bad[0]}: every scale must be a number above 0")
    missing = [p for p in NEEDED if not (args.root / p).exists()]
    if missing:
        parser.error(f"--root {args.root}: no {missing[0]}; run `dvc repro` there first")
    return args


def top_landing(counts: list[int], target: int, classes: list[str]) -> str:
    """The class, other than the target, that receives the most triggered images: where the rest go."""
    other = max((c for c in range(len(counts)) if c != target), key=lambda c: counts[c])
    return f"{classes[other]} {counts[other]}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| scale | L-inf (0-255) | poisoned linear ACC / ASR | poisoned kNN ACC / ASR | reference linear / kNN ASR "
             "| ratio linear / kNN | poisoned probe's other landing |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        p, c = r["poisoned"], r["reference"]
        lines.append(f"| {r['scale']:g} | {r['linf']:g} | {p['linear']['acc']:.3f} / {p['linear']['asr']:.3f} "
                     f"| {p['knn']['acc']:.3f} / {p['knn']['asr']:.3f} | {c['linear']['asr']:.3f} / {c['knn']['asr']:.3f} "
                     f"| {r['ratio']['linear']:.1f}x / {r['ratio']['knn']:.1f}x | {p['linear']['landing']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    root = args.root
    params = pipeline_params(root)
    seed, target = int(params.get("seed", 0)), int(params.get("target_class", 0))
    options = reader_options(params)
    trigger = load_trigger(root / "data/trigger")
    triggers = {scale: scaled_pattern(trigger, scale) for scale in args.scales}  # bad input fails before any reading
    clean, test = pipeline_sets(root)
    # The triggered test sets do not depend on the victim: built once per scale, read by both.
    triggered = {scale: triggered_test_set(test, scaled_trigger, target, seed).images
                 for scale, scaled_trigger in triggers.items()}
    readings: dict[str, dict[float, dict]] = {}
    for victim, path in VICTIMS.items():
        # One probe per encoder: the scale changes only what it reads.
        sets = read_triggered_sets(load_encoder(root / path), clean.images, clean.labels, test.images, test.labels,
                                   list(triggered.values()), target, clean.num_classes, **options)
        readings[victim] = {scale: {name: {"acc": metrics[name]["acc"], "asr": metrics[name]["asr"],
                                           "landing": top_landing(metrics[name]["landing"], target, test.classes)}
                                    for name in ("linear", "knn")}
                            for scale, metrics in zip(triggered, sets)}
    rows = []
    for scale in args.scales:
        poisoned, reference = readings["poisoned"][scale], readings["reference"][scale]
        rows.append({"scale": scale, "linf": float(trigger.params["linf"]) * scale, "poisoned": poisoned,
                     "reference": reference,
                     "ratio": {name: poisoned[name]["asr"] / max(reference[name]["asr"], 1e-3) for name in ("linear", "knn")}})
    command, data = command_line(argv), (params.get("data") or {}).get("name", "synthetic")
    env = environment(torch.device("cpu"))
    write_json(args.out, {"rows": rows, "_run": {"command": command, "env": env,
                                                 "trigger": trigger.name, "linf": float(trigger.params["linf"]),
                                                 "target_class": target, "seed": seed,
                                                 "data": data}})
    text = table(rows)
    args.out.with_suffix(".md").write_text(
        results_header("The trigger at other test-time amplitudes", command, env)
        + f"Data: {data}; target {test.classes[target]}; "
        f"the poisons carry the pattern at L-inf {float(trigger.params['linf']):g}.\n\n{text}\n")
    print(text)
    return {"rows": rows}


if __name__ == "__main__":
    run_script(main)
