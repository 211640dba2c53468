"""The ASR every trigger reaches at the pipeline's default budget, beside the ASR it gets with no poisoning at all.

Every trigger variant of `bench/trigger_survival.py` (each registered trigger at its default parameters,
two CTRL variants, and the learned `optimized` trigger with params.yaml's trigger.params, fitted on the
attacker's share of the training set) poisons the pipeline's training set (params.yaml: data, poison_rate,
target_class) and a SimCLR victim trains as `cba pretrain` would (params.yaml's pretrain section).
ASR is measured by a linear probe and by kNN, both fitted on clean labels.

`clean_asr` is the linear-probe ASR of the SAME trigger on one victim trained without any poison (it does
not depend on the trigger, so it is trained once): what a pattern does on its own. A backdoor took hold
where `linear_asr` is well above `clean_asr`.

Writes bench/results/trigger_asr.json in the shape `bench/trigger_survival.py --asr-json` reads:

    OMP_NUM_THREADS=2 python bench/trigger_asr.py --cache .cache/victims  # about 5 min a trigger on two CPU cores
    python bench/trigger_survival.py --asr-json bench/results/trigger_asr.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

from cba.attack import run_attack, trigger_scores, victim_settings
from cba.data import load_dataset
from cba.env import command_line, environment
from cba.errors import BenchParser, run_script
from cba.evaluate import pick_device
from cba.io import write_json
from cba.params_file import add_params_options, params_from_args
from cba.triggers import TRIGGERS, build_trigger
from cba.triggers.fitting import fit_trigger

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
CTRL_VARIANTS = {"ctrl_low8": {"positions": [[8, 8]]}, "ctrl_y": {"channels": ["Y"]}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--variants", default="all", help="comma-separated trigger variants, or all")
    add_params_options(parser, PARAMS)
    parser.add_argument("--train-size", type=int, default=None, help="default: params.yaml's data.options.train_size")
    parser.add_argument("--epochs", type=int, default=None, help="default: params.yaml's pretrain.epochs")
    parser.add_argument("--trigger-params", type=yaml.safe_load, default=None,
                        help="YAML params of the learned trigger (default: params.yaml's trigger.params)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", type=Path, default=None,
                        help="a folder of trained victims (cba.victim_cache): one trained before with the same settings, "
                             "data, trigger and code is loaded instead of trained (the clean one, above all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (the victims' training, the trigger fit)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/trigger_asr.json"))
    return parser.parse_args(argv)


def variants(params: dict[str, Any], override: dict | None) -> dict[str, tuple[str, dict]]:
    section = params.get("trigger") or {}
    learned = override if override is not None else (dict(section.get("params") or {}) if section.get("name") == "optimized" else {})
    found = {name: (name, learned if name == "optimized" else {}) for name in TRIGGERS.names()}
    found.update({label: ("ctrl", p) for label, p in CTRL_VARIANTS.items()})
    return dict(sorted(found.items()))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = command_line(argv)
    params = params_from_args(args)
    data = params.get("data") or {}
    options = dict(data.get("options") or {})
    if args.train_size is not None:
        options["train_size"] = args.train_size
    seed, target, rate = int(params.get("seed", 0)), int(params.get("target_class", 0)), float(params.get("poison_rate", 0.05))
    train_set = load_dataset(data.get("name", "synthetic"), "train", root=data.get("root"), seed=seed, **options)
    test = load_dataset(data.get("name", "synthetic"), "test", root=data.get("root"), seed=seed, **options)
    device = pick_device(args.device)
    chosen = variants(params, args.trigger_params)
    names = list(chosen) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in chosen]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(chosen)} or all")
    settings = {**victim_settings(params, "simclr"), "device": device, "progress": not args.quiet}
    if args.epochs:
        settings["epochs"] = args.epochs
    triggers = {}
    for name in names:
        trigger_name, trigger_params = chosen[name]
        triggers[name] = build_trigger(trigger_name, trigger_params, seed=seed, image_size=train_set.images.shape[1])
        fit_trigger(triggers[name], train_set.images, train_set.labels, target, seed, device, progress=not args.quiet)
    started = time.perf_counter()
    clean = run_attack(train_set, test, triggers[names[0]], mode="clean_label", poison_rate=0.0, cache=args.cache,
                       **settings)
    print(f"clean victim trained in {time.perf_counter() - started:.0f}s, final loss {clean.final_loss:.3f}", flush=True)
    run = {"command": command, "env": environment(device), "poison_rate": rate, "data": data.get("name", "synthetic"),
           "train_size": len(train_set)}
    results: dict[str, Any] = {}
    for name in names:
        started = time.perf_counter()
        victim = run_attack(train_set, test, triggers[name], mode="clean_label", poison_rate=rate, cache=args.cache,
                            **settings)
        poisoned, alone = trigger_scores(victim, triggers[name]), trigger_scores(clean, triggers[name])
        # the final losses: a victim whose loss went non-finite has no meaningful ASR
        results[name] = {"linear_asr": poisoned["probe_asr"], "knn_asr": poisoned["knn_asr"], "clean_asr": alone["probe_asr"],
                         "clean_knn_asr": alone["knn_asr"], "linear_acc": poisoned["probe_acc"], "knn_acc": poisoned["knn_acc"],
                         "final_loss": victim.final_loss, "clean_final_loss": clean.final_loss,
                         "seconds": time.perf_counter() - started}
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()), flush=True)
        # written after every victim, so that a stopped run keeps what it measured
        write_json(args.out, {**results, "_run": run})
    print(f"written {args.out}")


if __name__ == "__main__":
    run_script(main)
