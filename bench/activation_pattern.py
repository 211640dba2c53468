"""A test-time pattern that the poisoned surrogate reads as the target and clean encoders do not, on both victims.

The attacker's fit leaves it a surrogate that learned from the poisons and a copy that never saw one. After
the poison pattern is fixed, the attacker may stamp another pattern at test time, within the same L-inf
budget (`cba.triggers.activation`): starting from the poison pattern, signed steps make the poisoned
surrogate's probe read it as the target while clean readers do not. Clean readers: the fit's own clean copy
and, with `--clean-root`, the reference encoders (`cba reference`: no poisons) of other pipelines, standing
in for clean encoders the attacker trains itself. Never the root's own reference victim: it is what the
3x rule compares with, read here with the same test-time pattern as the poisoned victim.

Each root's trigger is refitted as `cba trigger` fits it (same params, seed and data) to recover the
attacker's models; `refit_matches` says whether the refit gave the root's own pattern to the bit (it does on
the processor and code that ran the pipeline).

    OMP_NUM_THREADS=2 python bench/activation_pattern.py --root <pipeline> [--clean-root <another> ...] --weights 5 10
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cba.env import command_line, environment, results_header
from cba.errors import BenchParser, run_script
from cba.data.io import load_imageset
from cba.io import write_json
from cba.models.io import load_encoder
from cba.readings import (ENCODERS, READERS, asr_by_trigger, pipeline_files, pipeline_params, read_pipeline_triggers,
                          unfinished, victim_cells)
from cba.triggers import build_trigger, load_trigger
from cba.triggers.activation import (attacker_readers, fit_activation_pattern, hit_rate, surrogate_reader,
                                     target_first)
from cba.triggers.fitting import fit_trigger
from cba.triggers.optimized import OptimizedTrigger

NEEDED = pipeline_files()
POISONED_ROOT_HEADS = 100  # the other roots' poisoned victims' heads draw from k = 100, 101, ...: apart from the rest
HEADS = ("probe", "centroid")


def parse_args(argv: list[str] | None = None):
    parser = BenchParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="a repository where `dvc repro finetune` has run")
    parser.add_argument("--clean-root", type=Path, action="append", default=[],
                        help="another such repository whose reference encoder joins the clean readers (repeat)")
    parser.add_argument("--poisoned-root", type=Path, action="append", default=[],
                        help="another such repository whose poisoned victim joins the poisoned readers (repeat): a "
                             "stand-in for a poisoned twin the attacker trains on its own poisons")
    parser.add_argument("--labels", choices=("pseudo", "true"), default="pseudo",
                        help="the heads every reader is read through: fitted on the attacker's pseudo-labels (its "
                             "threat model), or on its images' true labels (an attacker that holds them)")
    parser.add_argument("--weights", type=float, nargs="+", default=[10.0], help="weights of the clean readers' term")
    parser.add_argument("--poisoned-heads", nargs="+", choices=HEADS, default=["probe"],
                        help="the poisoned surrogate's heads the pattern should send to the target: probe (as the "
                             "victim's linear probe reads), centroid (nearest centroids, as kNN reads)")
    parser.add_argument("--steps", type=int, default=200, help="signed steps per weight")
    parser.add_argument("--step-size", type=float, default=0.02, help="each step as a fraction of the budget")
    parser.add_argument("--fit-seed", type=int, default=None,
                        help="seeds the test-time fits and the probe heads (default: the pipeline's seed); another one "
                             "shows how much a result owes to the fit's own draws")
    parser.add_argument("--diversity", type=float, default=0.0,
                        help="probability that a step reads its batch rescaled and shifted at random (input "
                             "diversity; 0: the plain fit)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/activation_pattern.json"))
    parser.add_argument("--quiet", action="store_true", help="no progress bar for the refit")
    args = parser.parse_args(argv)
    if any(not np.isfinite(w) or w < 0 for w in args.weights):
        parser.error(f"--weights {args.weights}: every weight must be a number >= 0")
    if not 0 <= args.diversity <= 1:
        parser.error(f"--diversity {args.diversity}: a probability in [0, 1]")
    if args.steps < 1 or not 0 < args.step_size <= 1:
        parser.error(f"--steps {args.steps} --step-size {args.step_size}: steps >= 1, step size in (0, 1]")
    refusal = unfinished((args.root, *args.clean_root, *args.poisoned_root), NEEDED)
    if refusal:
        parser.error(refusal)
    for flag, others in (("--clean-root", args.clean_root), ("--poisoned-root", args.poisoned_root)):
        if any(other.resolve() == args.root.resolve() for other in others):
            parser.error(f"{flag} {args.root}: the root's own victims are what the pattern is judged on")
    return args


def attacker_models(root: Path, params: dict, quiet: bool) -> tuple[dict, np.ndarray, Any]:
    """Refit the root's trigger as the trigger stage does; the attacker's models, the refit pattern, the trigger."""
    seed, target = int(params.get("seed", 0)), int(params.get("target_class", 0))
    saved = load_trigger(root / "data/trigger")
    if saved.name != "optimized":
        raise SystemExit(f"--root {root}: trigger {saved.name!r}; this bench refits the learned pattern (optimized)")
    section = params.get("trigger") or {}
    clean = load_imageset(root / "data/poisoned/clean_train.safetensors")
    trigger = build_trigger(section.get("name"), section.get("params") or {}, seed=seed,
                            image_size=clean.images.shape[1])
    keep: dict = {}
    fit_trigger(trigger, clean.images, clean.labels, target, seed, progress=not quiet, keep=keep)
    keep["labels"] = torch.as_tensor(target_first(keep["labels"], target))  # as the heads take them
    return keep, trigger.perturbation().astype(np.float32), saved


def read_root(args) -> dict[str, Any]:
    root = args.root
    params = pipeline_params(root)
    seed = int(params.get("seed", 0))
    fit_seed = seed if args.fit_seed is None else args.fit_seed  # the refit keeps the pipeline's seed
    keep, refit, saved = attacker_models(root, params, args.quiet)
    own = saved.tensors()["pattern"].numpy()
    linf, clusters = float(saved.params["linf"]), int(saved.params["clusters"])
    data, mask = keep["data"], keep["target_mask"]
    pool = data[torch.as_tensor(np.flatnonzero(~mask))]  # the attacker's non-target images

    labels = keep["labels"] if args.labels == "true" else None

    def reader(encoder, k: int, kind: str = "probe"):
        return surrogate_reader(encoder, data, mask, clusters, fit_seed, k, kind, labels)

    # The trigger stage's two readers; each head has its own generator, so the probe is the same whichever
    # heads the pattern is fitted to.
    probe, copy = attacker_readers(keep, mask, clusters, fit_seed, labels)
    heads = {"probe": probe, "centroid": reader(probe[0], -1, "centroid")}
    poisoned = [heads[kind] for kind in dict.fromkeys(args.poisoned_heads)]
    for k, other in enumerate(args.poisoned_root, start=POISONED_ROOT_HEADS):
        poisoned.append(reader(load_encoder(other / ENCODERS["poisoned"]).eval().requires_grad_(False), k))
    clean = [copy]
    for k, other in enumerate(args.clean_root, start=1):
        clean.append(reader(load_encoder(other / ENCODERS["reference"]).eval().requires_grad_(False), k))
    patterns = {"own": own}
    for weight in args.weights:
        patterns[f"weight {weight:g}"] = fit_activation_pattern(own, poisoned, clean, pool, linf, weight, args.steps,
                                                                args.step_size, fit_seed, diversity=args.diversity)
    triggers = [OptimizedTrigger.from_pattern(p, linf) for p in patterns.values()]
    readings = asr_by_trigger(read_pipeline_triggers(root, params, triggers, ENCODERS))
    # The other clean readers as their own pipelines read them (true labels, their test sets): what the fit
    # suppressed on them, apart from what it left on the held-out reference victim.
    fitted: dict[str, list] = {"reference": [], "poisoned": []}
    for victim, flag, others in (("reference", "--clean-root", args.clean_root),
                                 ("poisoned", "--poisoned-root", args.poisoned_root)):
        for other in others:
            other_params = pipeline_params(other)
            if int(other_params.get("target_class", 0)) != int(params.get("target_class", 0)):
                raise SystemExit(f"{flag} {other}: aims at class {other_params.get('target_class', 0)}, the root at "
                                 f"{params.get('target_class', 0)}; its victim's ASR would count another class")
            encoders = {victim: ENCODERS[victim]}
            fitted[victim].append(asr_by_trigger(read_pipeline_triggers(other, other_params, triggers, encoders)))
    rows = []
    for i, (name, pattern) in enumerate(patterns.items()):
        hits = [hit_rate(reader, pool, pattern) for reader in clean]
        rows.append({"pattern": name, "surrogate_hit_rate": hit_rate(heads["probe"], pool, pattern),
                     "surrogate_centroid_hit_rate": hit_rate(heads["centroid"], pool, pattern),
                     "clean_copy_hit_rate": hits[0], "clean_readers_hit_rate": float(np.mean(hits)),
                     "correlation_with_own": float(np.corrcoef(pattern.ravel(), own.ravel())[0, 1]),
                     **readings[i], "clean_roots": [other[i]["reference"] for other in fitted["reference"]],
                     **({"poisoned_roots": [other[i]["poisoned"] for other in fitted["poisoned"]]}
                        if args.poisoned_root else {})})
    return {"root": str(root), "seed": seed, "fit_seed": fit_seed, "diversity": args.diversity, "labels": args.labels,
            "poison_rate": float(params.get("poison_rate", 0.0)),
            "poisoned_heads": list(dict.fromkeys(args.poisoned_heads)),
            "clean_roots": [str(r) for r in args.clean_root],
            **({"poisoned_roots": [str(r) for r in args.poisoned_root]} if args.poisoned_root else {}),
            "refit_matches": bool(np.array_equal(refit, own)),
            "rows": rows, "patterns": {name: pattern.tolist() for name, pattern in patterns.items()}}


def table(result: dict[str, Any]) -> str:
    readers = 1 + len(result["clean_roots"])
    heads = ("" if result["poisoned_heads"] == ["probe"]
             else f", fitted to the surrogate's {' and '.join(result['poisoned_heads'])}")
    fit = "" if result.get("fit_seed", result["seed"]) == result["seed"] else f", fit seed {result['fit_seed']}"
    fit += f", input diversity {result['diversity']:g}" if result.get("diversity") else ""
    fit += ", heads on true labels" if result.get("labels") == "true" else ""
    twins = len(result.get("poisoned_roots", []))
    fit += f", {twins} more poisoned reader{'s' if twins > 1 else ''}" if twins else ""
    lines = [f"**seed {result['seed']}, poison rate {result['poison_rate']:g}**, {readers} clean reader"
             f"{'s' if readers > 1 else ''}{heads}{fit} "
             f"(refit matches the pipeline's pattern: {result['refit_matches']})", "",
             "| test-time pattern | attacker's poisoned surrogate / clean copy / mean clean reader hit rate "
             "| correlation with own | poisoned linear / kNN ASR | reference linear / kNN ASR | ratio linear / kNN "
             "| other clean roots' reference victims, mean linear / kNN ASR |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['pattern']} | {r['surrogate_hit_rate']:.3f} / {r['clean_copy_hit_rate']:.3f} / "
                     f"{r['clean_readers_hit_rate']:.3f} | {r['correlation_with_own']:.2f} "
                     f"| {victim_cells(r['poisoned'], r['reference'], 2)} | "
                     + (" / ".join(f"{np.mean([o[n] for o in r['clean_roots']]):.3f}" for n in READERS)
                        if r["clean_roots"] else "–")
                     + ("; their poisoned victims " + " / ".join(f"{np.mean([o[n] for o in r['poisoned_roots']]):.3f}"
                                                                for n in READERS) if twins else "") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = read_root(args)
    command, env = command_line(argv), environment(torch.device("cpu"))
    write_json(args.out, {**result, "_run": {"command": command, "env": env, "steps": args.steps,
                                             "step_size": args.step_size}})
    text = table(result)
    args.out.with_suffix(".md").write_text(
        results_header("A test-time pattern fitted against the attacker's poisoned and clean models", command, env)
        + text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    run_script(main)
