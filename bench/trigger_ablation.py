"""What each part of the optimized trigger's objective buys: fit variants, then attack a SimCLR victim with each.

Variants of params.yaml's `trigger.params` (the learned trigger):

- full: the objective as configured;
- no_bilevel: the surrogate stays as its clean warm-up left it (no poisoned rounds);
- no_agree: w_agree = 0 (no view-agreement term);
- no_target: w_target = 0 (no pull to the target cluster);
- no_eot: the pattern is optimised on raw images, without the augmentation pipeline;
- random: no optimisation at all, random signs at the budget (the floor).

Every variant then poisons the same training set (clean-label, params.yaml's poison_rate) and trains the
same SimCLR victim as the pipeline (params.yaml's pretrain settings), measured by a linear probe and kNN
on clean labels. poison_rate 0 rows score the same pattern on one victim trained on unpoisoned data: the ASR a
trigger gets without any poisoning (a universal adversarial pattern would score there). Survival is
`cba.survival`'s measure under the full per-sample pipeline.

    OMP_NUM_THREADS=2 python bench/trigger_ablation.py                          # about 8 min a variant on two CPU cores
    python bench/trigger_ablation.py --variants full,random --train-size 300 --test-size 100 --epochs 1 \
        --trigger-params '{surrogate_size: 200, surrogate_epochs: 1, rounds: 1, trigger_steps: 2}' --out /tmp/ab.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cba.attack import run_attack, trigger_scores, victim_settings
from cba.data import load_dataset
from cba.env import command_line, environment, where_it_ran
from cba.errors import BenchParser, run_script
from cba.evaluate import pick_device
from cba.io import atomic_path, write_json
from cba.survival import survival_table
from cba.triggers import build_trigger
from cba.triggers.fitting import fit_trigger

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {}, "no_bilevel": {"bilevel": False}, "no_agree": {"w_agree": 0.0}, "no_target": {"w_target": 0.0},
    "no_eot": {"eot": False}, "random": {},
}
COLUMNS = ["variant", "poison_rate", "probe_acc", "probe_asr", "knn_acc", "knn_asr", "survival", "view_agreement",
           "hit_rate", "fit_s"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    params = yaml.safe_load(PARAMS.read_text()) or {}
    pretrain = params.get("pretrain") or {}
    parser = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--variants", default="all", help=f"comma-separated subset of {','.join(VARIANTS)}, or all")
    parser.add_argument("--clean", default="full,random", help="variants also measured on a victim trained without poisons")
    parser.add_argument("--dataset", default=(params.get("data") or {}).get("name", "synthetic"))
    parser.add_argument("--train-size", type=int, default=(params.get("data") or {}).get("options", {}).get("train_size", 10000))
    parser.add_argument("--test-size", type=int, default=(params.get("data") or {}).get("options", {}).get("test_size", 2000))
    parser.add_argument("--epochs", type=int, default=pretrain.get("epochs", 20))
    parser.add_argument("--width", type=int, default=pretrain.get("width", 16))
    parser.add_argument("--poison-rate", type=float, default=params.get("poison_rate", 0.05))
    parser.add_argument("--target-class", type=int, default=params.get("target_class", 0))
    parser.add_argument("--trigger-params", type=yaml.safe_load, default=None,
                        help="YAML overrides of params.yaml's trigger.params for every variant")
    parser.add_argument("--seed", type=int, default=params.get("seed", 0))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (the victims' training, the trigger fit)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/trigger_ablation.md"))
    args = parser.parse_args(argv)
    args.variant_list = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    args.clean_list = [v.strip() for v in args.clean.split(",") if v.strip()]
    if not args.variant_list or any(v not in VARIANTS for v in args.variant_list + args.clean_list):
        parser.error(f"--variants/--clean: choose from {', '.join(VARIANTS)}")
    section = params.get("trigger") or {}
    base = dict(section.get("params") or {}) if section.get("name") == "optimized" else {}
    args.base_params = {**base, **(args.trigger_params or {})}
    # The pipeline's victim; the command line overrides its size and seed.
    args.victim = {**victim_settings(params, "simclr"), "width": args.width, "epochs": args.epochs, "seed": args.seed,
                   "target_class": args.target_class, "progress": not args.quiet}
    args.min_scale = args.victim["min_scale"]
    return args


def make_trigger(variant: str, args: argparse.Namespace, train_set, device: torch.device) -> tuple[Any, dict]:
    trigger = build_trigger("optimized", {**args.base_params, **VARIANTS[variant]}, seed=args.seed,
                            image_size=train_set.images.shape[1])
    started = time.perf_counter()
    if variant == "random":
        linf = trigger.params["linf"]
        signs = np.random.default_rng([args.seed, 0xBAD]).choice([-1.0, 1.0], size=trigger.perturbation().shape)
        trigger.set_tensors({"pattern": torch.from_numpy((signs * linf).astype(np.float32))})
        return trigger, {"fit_s": 0.0}
    info = fit_trigger(trigger, train_set.images, train_set.labels, args.target_class, args.seed, device,
                       progress=not args.quiet)
    return trigger, {"fit_s": time.perf_counter() - started, "hit_rate": info["history"][-1]["hit_rate"],
                     "history": info["history"]}


def victim(trigger, rate: float, args: argparse.Namespace, train_set, test, device: torch.device):
    """The pipeline's SimCLR victim, poisoned with `trigger` at `rate` (0: never sees it)."""
    return run_attack(train_set, test, trigger, mode="clean_label", poison_rate=rate, device=device, **args.victim)


def markdown(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.0f}" if value > 10 else f"{value:.3f}"
        return "–" if value is None else str(value)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(fmt(row.get(c)) for c in COLUMNS) + " |" for row in rows])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = command_line(argv)
    device = pick_device(args.device)
    size = {"train_size": args.train_size, "test_size": args.test_size}
    train_set = load_dataset(args.dataset, "train", seed=args.seed, **size)
    test = load_dataset(args.dataset, "test", seed=args.seed, **size)
    rows = []
    # A victim that never sees a poison does not depend on the trigger: train it once, score every pattern on it.
    unfitted = build_trigger("optimized", args.base_params, seed=args.seed, image_size=train_set.images.shape[1])
    clean_victim = victim(unfitted, 0.0, args, train_set, test, device) if args.clean_list else None
    for variant in args.variant_list:
        trigger, fitted = make_trigger(variant, args, train_set, device)
        survival = survival_table(trigger, test.images[:256], args.min_scale, args.seed, draws=2, augmentations=["ssl"])[0]
        common = {"variant": variant, **fitted, "survival": survival["survival"], "view_agreement": survival["view_agreement"]}
        if variant in args.clean_list:
            rows.append({**common, "poison_rate": 0.0, **trigger_scores(clean_victim, trigger)})
        record = victim(trigger, args.poison_rate, args, train_set, test, device)
        rows.append({**common, "poison_rate": args.poison_rate, **trigger_scores(record, trigger)})
        print(markdown(rows[-2:] if variant in args.clean_list else rows[-1:]), flush=True)
        # Written after every variant, so a stopped run keeps what it measured.
        write_results(rows, args, command, device, done=variant == args.variant_list[-1])
    print(results_text(rows, args, command, device))


def results_text(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, device: torch.device) -> str:
    env = environment(device)
    return "\n".join([
        "# Optimized trigger: ablation of its objective", "", f"Command: `{command}`", "",
        f"Run {dt.datetime.now().isoformat(timespec='seconds')} on {where_it_ran(env)}; data: {args.dataset} {args.train_size}/{args.test_size}, SimCLR {args.epochs} epochs, "
        f"width {args.width}, clean-label at {args.poison_rate:g}, seed {args.seed}.", "",
        "Trigger params: " + ", ".join(f"{k}={v}" for k, v in sorted(args.base_params.items())), "",
        markdown(rows), "",
        "poison_rate 0 rows: the victim never saw a poison; their ASR is what the pattern does on its own. "
        "hit_rate: share of triggered images the surrogate's head sends to the target, in the last "
        "round (a label-free proxy of ASR on the surrogate). fit_s: seconds to fit the trigger.", "",
    ])


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, device: torch.device,
                  done: bool) -> None:
    text = results_text(rows, args, command, device)
    if not done:
        text += f"\n(partial: {len({r['variant'] for r in rows})} of {len(args.variant_list)} variants so far)\n"
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    write_json(args.out.with_suffix(".json"), {"command": command, "complete": bool(done), "settings": {
        k: v for k, v in vars(args).items() if k not in ("out",)} | {"out": str(args.out)}, "rows": rows})


if __name__ == "__main__":
    run_script(main)
