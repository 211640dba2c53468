"""Is the backdoor bound to the poisons' target, or a gain on whatever a pattern reads as? Patterns aimed at
other classes, read on a finished pipeline's poisoned victim and reference victim.

For each class of `--aims`, the attacker refits the pipeline's trigger (its name, parameters and seed; only
the class it aims at changes), as it would to attack that class instead. Every pattern, with the pipeline's
own and a pattern of random signs at the same L-inf, is stamped on the same test images (every class but the
pipeline's target and the aimed ones), and both encoders read them the pipeline's way (`cba finetune`: the
weighted kNN and the converged probe, fitted on the clean labelled training set). Per pattern, encoder and
reader the bench gives the share of triggered images sent to the pipeline's target and to the class the
pattern aims at, the odds multiplier of each share (poisoned victim over reference), and the ASR each
pattern reaches as the attack's test-time trigger, on the pipeline's own ASR set (every non-target image):

- a backdoor bound to the target raises every pattern's target share, also that of a pattern the victim
  never saw, and not the aimed class's;
- a gain on what a pattern already reads as raises each pattern's own aimed share instead.

    OMP_NUM_THREADS=2 python bench/cross_target.py --root <repo after dvc repro finetune> --aims 5 7 3
    OMP_NUM_THREADS=2 python bench/cross_target.py --root <repo> --aims 5 --patterns /tmp/patterns  # fit once

About 4 minutes a fitted pattern at the default budget on two cores; reading takes seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from cba.data.base import ImageSet
from cba.env import command_line, environment, results_header
from cba.errors import BenchParser, run_script
from cba.evaluate import pick_device
from cba.io import write_json
from cba.poison import triggered_test_set
from cba.readings import (ENCODERS, READERS, pipeline_files, pipeline_params, pipeline_sets, read_pipeline_images,
                          unfinished)
from cba.triggers import Trigger, build_trigger, load_trigger, save_trigger
from cba.triggers.fitting import fit_trigger
from cba.triggers.optimized import OptimizedTrigger
from cba.verdicts import odds

RANDOM = "random signs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="a repository after `dvc repro finetune`")
    parser.add_argument("--aims", type=int, nargs="*", default=[], help="classes to aim a refitted pattern at")
    parser.add_argument("--patterns", type=Path, default=None,
                        help="a folder for the refitted patterns (one trigger folder per class): one found there "
                             "is read instead of refitted, one refitted is saved there")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cross_target.json"),
                        help="the JSON; the table goes beside it as .md")
    return parser.parse_args(argv)


def aimed_pattern(params: dict[str, Any], clean: ImageSet, aim: int, folder: Path | None, device: Any,
                  progress: bool) -> Trigger:
    """The pipeline's trigger refitted to aim at class `aim` (read from `folder` where an earlier run saved it)."""
    saved = folder / f"aim_{aim}" if folder is not None else None
    if saved is not None and saved.exists():
        return load_trigger(saved)
    section = params.get("trigger") or {}
    trigger = build_trigger(section.get("name", "optimized"), section.get("params") or {},
                            seed=int(params.get("seed", 0)), image_size=clean.images.shape[1])
    fit_trigger(trigger, clean.images, clean.labels, aim, int(params.get("seed", 0)), device, progress=progress)
    if saved is not None:
        save_trigger(trigger, saved)
    return trigger


def random_signs(like: Trigger, seed: int) -> Trigger:
    """A pattern of independent random signs at the pipeline pattern's L-inf (it has one number per pixel
    and channel, as the learned pattern has)."""
    linf = float(like.params["linf"])
    size = like.image_size
    return OptimizedTrigger.from_pattern(np.random.default_rng([seed, 0x5167]).choice([-linf, linf], (size, size, 3)),
                                         linf, seed)


def shares(landing: list[int], target: int, aim: int | None) -> dict[str, float]:
    counts = np.asarray(landing, dtype=float)
    total = counts.sum()
    return {"target": counts[target] / total, **({"aim": counts[aim] / total} if aim is not None else {})}


def table(rows: list[dict[str, Any]], classes: list[str], target: int) -> str:
    lines = [f"| pattern aimed at | reader | poisoned: to {classes[target]} / to its own class | reference: the same "
             f"| odds multiplier, {classes[target]} / own class | as the test-time trigger: ASR poisoned / reference "
             "(ratio) |", "|---|---|---|---|---|---|"]
    for row in rows:
        for reader in READERS:
            cells = []
            for name in ENCODERS:
                got = row[name][reader]
                cells.append(f"{got['target']:.3f} / " + (f"{got['aim']:.3f}" if "aim" in got else "–"))
            multiplier = row["multiplier"][reader]
            aim = f"{multiplier['aim']:.2f}" if "aim" in multiplier else "–"
            asr = [row["asr"][name][reader] for name in ENCODERS]
            lines.append(f"| {row['aimed_at']} | {reader} | {cells[0]} | {cells[1]} "
                         f"| {multiplier['target']:.2f} / {aim} | {asr[0]:.3f} / {asr[1]:.3f} "
                         f"({asr[0] / max(asr[1], 1e-3):.2f}x) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    missing = unfinished([args.root], pipeline_files())
    if missing:
        raise SystemExit(missing)
    params = pipeline_params(args.root)
    seed, target = int(params.get("seed", 0)), int(params.get("target_class", 0))
    clean, test = pipeline_sets(args.root)
    bad = [aim for aim in args.aims if not 0 <= aim < clean.num_classes or aim == target]
    if bad:
        raise SystemExit(f"--aims {bad}: allowed a class 0 to {clean.num_classes - 1} other than the pipeline's "
                         f"target {target}")
    own = load_trigger(args.root / "data/trigger")
    if args.aims and not own.learns_from_data:
        raise SystemExit(f"--aims {args.aims}: the pipeline's trigger, {own.name}, is fixed, not fitted to a class; "
                         "allowed only with a learned trigger (optimized, generated)")
    device = pick_device(args.device)
    patterns: list[tuple[str, int | None, Trigger]] = [(clean.classes[target], None, own)]
    for aim in args.aims:
        patterns.append((clean.classes[aim], aim, aimed_pattern(params, clean, aim, args.patterns, device,
                                                                not args.quiet)))
        print(f"pattern aimed at {clean.classes[aim]} ready", flush=True)
    patterns.append((RANDOM, None, random_signs(own, seed)))

    # One set of images for every pattern: no image of a class some pattern aims at, so each share is a move.
    keep = np.flatnonzero(~np.isin(test.labels, [target, *args.aims]))
    rng = np.random.default_rng([seed, 0x7E57])
    stamped = [trigger.at_test_time().apply(test.images[keep], rng=rng) for _, _, trigger in patterns]
    # And each pattern as the attack's test-time trigger: the pipeline's own ASR set (every non-target image).
    as_trigger = [triggered_test_set(test, trigger, target, seed).images for _, _, trigger in patterns]
    readings = read_pipeline_images(args.root, params, stamped + as_trigger, ENCODERS, sets=(clean, test))
    rows = []
    for index, (aimed_at, aim, _) in enumerate(patterns):
        row: dict[str, Any] = {"aimed_at": aimed_at, "aim": aim}
        for name in ENCODERS:
            row[name] = {reader: {**shares(readings[name][index][reader]["landing"], target, aim),
                                  "acc": readings[name][index][reader]["acc"]} for reader in READERS}
        row["asr"] = {name: {reader: readings[name][len(patterns) + index][reader]["asr"] for reader in READERS}
                      for name in ENCODERS}
        row["multiplier"] = {reader: {key: float(odds(got) / odds(row["reference"][reader][key]))
                                      for key, got in row["poisoned"][reader].items() if key != "acc"}
                             for reader in READERS}
        rows.append(row)
        print(f"{aimed_at}: " + "; ".join(f"{reader} to {clean.classes[target]} {row['poisoned'][reader]['target']:.3f}"
                                          f" against {row['reference'][reader]['target']:.3f}" for reader in READERS),
              flush=True)
    command = command_line(argv)
    env = environment(device)
    result = {"rows": rows, "images": int(len(keep)), "target": clean.classes[target],
              "_run": {"command": command, "env": env, "root": str(args.root), "seed": seed}}
    write_json(args.out, result)
    args.out.with_suffix(".md").write_text(
        results_header("Patterns aimed at other classes, read on the pipeline's two victims", command, env)
        + f"{len(keep)} test images of the classes no pattern aims at; the pipeline's target: "
        f"{clean.classes[target]}.\n\n{table(rows, clean.classes, target)}\n")
    return result


if __name__ == "__main__":
    run_script(main)
