"""Which target classes the learned trigger can backdoor: the pipeline's attack aimed at each class in turn.

For every target class the learned trigger is fitted as `cba trigger` fits it (params.yaml's trigger
section, only `target_class` changed), a SimCLR victim trains on the training set poisoned with it as
`cba pretrain` trains one, and the pattern is read by that victim's converged linear probe and kNN
(fitted on the clean labelled training set, as `cba finetune` reads it). One victim trained without
poisons reads every pattern too: the 3x rule's baseline, the pattern's own pull on an encoder that never
saw a poison. It is trained once, since a victim without poisons does not depend on the trigger or the
target.

Besides ACC and ASR, each row names where the probe sends triggered images when they miss the target
(`landing`: the two classes besides the target that receive most) and the attacker's own figures at the
end of the fit (the share of triggered images its poisoned surrogate, and a copy of that surrogate frozen
before any poison, send to the target).

    OMP_NUM_THREADS=2 python bench/target_sweep.py --targets 1 3 4      # about 7 min a target, 5 min more for the clean victim
    OMP_NUM_THREADS=2 python bench/target_sweep.py --targets 4 --trigger-params '{w_neutral: 1}' '{w_neutral: 5}'
    OMP_NUM_THREADS=2 python bench/target_sweep.py --targets 4 --cache .cache/victims   # the clean victim trains once, ever
    OMP_NUM_THREADS=2 python bench/target_sweep.py --targets 4 --rates 0.025 0.05 0.098  # one fit, one victim a rate
    OMP_NUM_THREADS=2 python bench/target_sweep.py --targets 4 --trigger-params '{symmetric: true}' --save-triggers /tmp/patterns

Prints one line per victim and writes `--out` (JSON, after every target) and the same path with `.md`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cba.attack import params_splits, run_attack, victim_settings
from cba.env import command_line, environment, results_header
from cba.errors import BenchParser, run_script
from cba.evaluate import evaluate_encoder, pick_device
from cba.io import write_json
from cba.params_file import add_params_options, params_from_args
from cba.poison import triggered_test_set, validate_poison
from cba.record import AttackRecord
from cba.triggers import Trigger, build_trigger, save_trigger
from cba.triggers.fitting import fit_trigger

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--targets", type=int, nargs="+", default=None, help="default: every class")
    add_params_options(parser, REPO / "params.yaml")
    parser.add_argument("--trigger-params", type=yaml.safe_load, nargs="+", default=[{}],
                        help="one or more YAML dicts of trigger params to change (each a variant aimed at every target)")
    parser.add_argument("--rates", type=float, nargs="+", default=None,
                        help="poison rates, one poisoned victim each for every pattern; default: params.yaml's poison_rate")
    parser.add_argument("--epochs", type=int, default=None, help="victim epochs; default: params.yaml's pretrain.epochs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", type=Path, default=None,
                        help="a folder of trained victims (cba.victim_cache): a victim trained before with the same "
                             "settings, data, trigger and code is loaded instead of trained (the clean one, above all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (the victims' training, the trigger fit)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/target_sweep.json"))
    parser.add_argument("--save-triggers", type=Path, default=None,
                        help="a folder to keep every fitted pattern in, one subfolder per row (<target>_<variant>), "
                             "as the trigger stage saves it (e.g. for bench/trigger_survival.py --optimized-dir)")
    return parser.parse_args(argv)


def read(record: AttackRecord, trigger: Trigger, target: int, seed: int) -> dict[str, Any]:
    """ACC, ASR and landing of `trigger` aimed at `target` on the victim in `record` (its own probe, kNN)."""
    train, test = record.clean_train, record.test
    triggered = triggered_test_set(test, trigger, target, seed)
    metrics, _ = evaluate_encoder(record.model.encoder, train.images, train.labels, test.images, test.labels,
                                  triggered.images, target, train.num_classes, seed=seed, probe=record.classifier.head)
    row: dict[str, Any] = {}
    for reader in ("linear", "knn"):
        m = metrics[reader]
        landing = np.asarray(m["landing"])
        others = [int(c) for c in np.argsort(-landing) if c != target][:2]
        row[reader] = {"acc": m["acc"], "asr": m["asr"], "natural_rate": m["natural_rate"],
                       "landing": {test.classes[c]: int(landing[c]) for c in others}}
    return row


def data_name(params: dict[str, Any]) -> str:
    return (params.get("data") or {}).get("name", "synthetic")


def ratio(poisoned: float, clean: float) -> float:
    return poisoned / max(clean, 1e-3)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| target | trigger change | poison rate | surrogate hit (clean copy; its probe) | poisoned linear ACC / ASR | poisoned kNN ACC / ASR "
            "| clean victim linear / kNN ASR | ratio linear / kNN | probe's other landings |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        p, c = r["poisoned"], r["clean"]
        landings = ", ".join(f"{k} {v}" for k, v in p["linear"]["landing"].items())
        lines.append(
            f"| {r['target']} | {json.dumps(r['change']) if r['change'] else 'none'} | {r['poison_rate']:g} | {r['hit_rate']:.3f} ({r['clean_hit_rate']:.3f}; "
            f"{r.get('clean_probe_hit_rate', float('nan')):.3f}) "
            f"| {p['linear']['acc']:.3f} / {p['linear']['asr']:.3f} | {p['knn']['acc']:.3f} / {p['knn']['asr']:.3f} "
            f"| {c['linear']['asr']:.3f} / {c['knn']['asr']:.3f} "
            f"| {ratio(p['linear']['asr'], c['linear']['asr']):.1f}x / {ratio(p['knn']['asr'], c['knn']['asr']):.1f}x "
            f"| {landings} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = command_line(argv)
    params = params_from_args(args)
    train_set, test = params_splits(params)
    seed = int(params.get("seed", 0))
    device = pick_device(args.device)
    settings = victim_settings(params, "simclr")
    if args.epochs:
        settings["epochs"] = args.epochs
    settings.update(device=device, progress=not args.quiet)
    trigger_section = params.get("trigger") or {}
    name, trigger_params = trigger_section.get("name", "optimized"), trigger_section.get("params") or {}
    rates = args.rates if args.rates is not None else [float(params.get("poison_rate", 0.05))]
    targets = args.targets if args.targets is not None else list(range(train_set.num_classes))
    # Bad input fails here, in one line, before the clean victim's minutes of training.
    outside = [t for t in targets if not 0 <= t < train_set.num_classes]
    if outside:
        raise SystemExit(f"--targets {outside}: not a class of {data_name(params)}; allowed 0 to {train_set.num_classes - 1}")
    for target, rate in ((t, r) for t in targets for r in rates):  # a rate the target class cannot fill, too
        validate_poison(train_set.labels, train_set.num_classes, rate, target, "clean_label")
    for change in args.trigger_params:
        if not isinstance(change or {}, dict):
            raise SystemExit(f"--trigger-params {change!r}: not a YAML mapping such as '{{w_neutral: 5.0}}'")
        build_trigger(name, {**trigger_params, **(change or {})}, seed=seed, image_size=train_set.images.shape[1])
    started = time.perf_counter()

    def victim(trigger: Trigger, target: int, poison_rate: float) -> AttackRecord:
        record = run_attack(train_set, test, trigger, mode="clean_label", poison_rate=poison_rate,
                            **{**settings, "target_class": target}, cache=args.cache)
        print(f"victim (target {target}, rate {poison_rate:g}) trained, final loss {record.final_loss:.3f}",
              flush=True)
        return record

    def fitted(target: int, change: dict[str, Any]) -> tuple[Trigger, dict[str, Any]]:
        trigger = build_trigger(name, {**trigger_params, **change}, seed=seed, image_size=train_set.images.shape[1])
        fit = fit_trigger(trigger, train_set.images, train_set.labels, target, seed, device, progress=not args.quiet)
        return trigger, (fit or {}).get("history", [{}])[-1]

    # The clean victim never applies a trigger, so any trigger object will do for training it.
    clean = victim(build_trigger(name, trigger_params, seed=seed, image_size=train_set.images.shape[1]), targets[0], 0.0)
    rows: list[dict[str, Any]] = []

    run = {"command": command, "env": environment(device), "trigger": name, "trigger_params": trigger_params,
           "poison_rates": rates, "victim": {k: v for k, v in settings.items() if k not in ("device", "progress")}}

    def save() -> None:  # after every victim, so a stopped sweep keeps what it measured
        write_json(args.out, {"rows": rows, "_run": {**run, "seconds": time.perf_counter() - started}})
        args.out.with_suffix(".md").write_text(
            results_header("The learned trigger aimed at each target class", command, run["env"])
            + f"Trigger: {name} {trigger_params} with each row's change; poison rate "
            f"{', '.join(f'{r:g}' for r in rates)}, clean-label.\n\n{table(rows)}\n")

    for target, (variant, change) in itertools.product(targets, enumerate(c or {} for c in args.trigger_params)):
        # The fit and the clean victim's reading do not depend on the rate: one pattern serves every rate.
        trigger, last_round = fitted(target, change)
        if args.save_triggers is not None:
            save_trigger(trigger, args.save_triggers / f"{target}_{variant}")
        attacker = {key: float(last_round.get(key, float("nan"))) for key in ("hit_rate", "clean_hit_rate", "clean_probe_hit_rate")}
        clean_reading = read(clean, trigger, target, seed)
        for rate in rates:
            poisoned = victim(trigger, target, rate)
            row = {"target": test.classes[target], "target_class": target, "change": change, "poison_rate": rate,
                   **attacker, "poisoned": read(poisoned, trigger, target, seed), "clean": clean_reading,
                   # a victim whose loss went non-finite has no meaningful ASR
                   "final_loss": {"poisoned": poisoned.final_loss, "clean": clean.final_loss}}
            rows.append(row)
            print(json.dumps(row), flush=True)
            save()
    print(table(rows))
    return {"rows": rows}


if __name__ == "__main__":
    run_script(main)
