"""How a backdoor changes as the victim's encoder matures: ACC and ASR every few epochs, poisoned beside clean.

One victim trains as `cba pretrain` would (params.yaml's data, seed, target_class and pretrain
section, its method unless `--method` names another), for `--epochs` instead of pretrain.epochs, on the training set poisoned with one trigger; every
`--every` epochs the encoder is read as `cba finetune` reads it: the converged linear probe and kNN, both
fitted on the clean labelled training set (`cba.evaluate.evaluate_encoder`). With `--clean` a second
victim trains the same way without poisons and is read with the same trigger: the 3x rule's baseline at
every epoch, since a pattern's own pull (an adversarial direction) changes as the encoder matures too.

The trigger is the pipeline's (`data/trigger`, from the last `cba trigger`), or with `--trigger-params` the
learned trigger refitted with those params (e.g. `'{w_target: 0}'`: a pattern fitted only to survive the
augmentation and to make two views agree, with no pull towards the target). `--trigger-name` picks another
registered trigger; a fixed one (ctrl, ssl_patch, ...) is built from the seed with those params, no fit:

    OMP_NUM_THREADS=2 python bench/maturity.py --trigger-name ctrl --trigger-params '{}' --epochs 40 --every 10 --clean

    OMP_NUM_THREADS=2 python bench/maturity.py --epochs 40 --every 10 --clean    # about 25 min on two cores

`--readout` also reads, at every evaluation of the poisoned victim, what it does with the trigger feature
(`cba.analysis.readout`): `offset_over_target`, the length of the poisons' own feature (their mean feature less
the clean target images') over that of the target's (the clean target images' mean less the probe's centring
mean); `shift_over_offset`, how much of it a triggered test image carries; `offset_target_alignment`, the cosine
of the two directions; `target_margin`, the probe's logit gain for the target from the mean shift, less the
largest other gain. A backdoor that fades because the encoder drops the trigger shows as a shrinking offset; one
that fades because the trigger's feature points away from the target, as a falling alignment.

Prints one JSON row per evaluation and writes `--out` (JSON), the same path with `.md` (a table) and with
`.png` (ASR and ACC against the epoch, poisoned beside clean). `--plot-from RESULT.json` redraws the
figure of an earlier run from its JSON, without training:

    python bench/maturity.py --plot-from bench/results/maturity_plus.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cba.attack import params_splits, run_attack, victim_settings
from cba.env import command_line, environment, results_header
from cba.analysis.readout import trigger_readout
from cba.evaluate import evaluate_encoder, extract_features, pick_device
from cba.errors import BenchParser, ConfigError, run_script
from cba.io import read_json, write_json, write_png
from cba.params_file import add_params_options, params_from_args
from cba.poison import choose_poison_indices, poison_dataset, triggered_test_set, validate_poison
from cba.ssl import METHODS
from cba.triggers import TRIGGERS, Trigger, build_trigger, load_trigger, save_trigger
from cba.triggers.fitting import fit_trigger

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("epoch", "loss", "knn_acc", "knn_asr", "linear_acc", "linear_asr")
# With --readout, what the poisoned encoder does with the trigger feature (cba.analysis.readout): how large the
# poisons' own feature is beside the target's, whether test images carry it, and whether it points at the target.
READOUT = ("offset_over_target", "shift_over_offset", "offset_target_alignment", "target_margin")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--width", type=int, default=None, help="default: params.yaml's pretrain.width")
    parser.add_argument("--method", default=None, choices=METHODS.names(),
                        help="the victim's pretraining method; default: params.yaml's pretrain.method")
    parser.add_argument("--rate", type=float, default=None, help="poison rate; default: params.yaml's poison_rate")
    parser.add_argument("--clean", action="store_true", help="also train a victim without poisons")
    parser.add_argument("--trigger-params", type=yaml.safe_load, default=None,
                        help="refit the learned trigger with these YAML params instead of loading data/trigger")
    parser.add_argument("--trigger-name", default="optimized", choices=TRIGGERS.names(),
                        help="the trigger --trigger-params builds: a learned one (optimized, generated) is fitted "
                             "as `cba trigger` fits it, a fixed one only built from the seed")
    parser.add_argument("--trigger", type=Path, default=REPO / "data" / "trigger",
                        help="the saved trigger to load when --trigger-params is not given")
    parser.add_argument("--save-trigger", type=Path, default=None,
                        help="save the refitted trigger to this folder (loadable as data/trigger is)")
    add_params_options(parser, REPO / "params.yaml")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (the victims' training, the trigger fit)")
    parser.add_argument("--readout", action="store_true",
                        help="also read the poisoned encoder's trigger feature at every evaluation: "
                             + ", ".join(READOUT) + " (cba.analysis.readout)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/maturity.json"))
    parser.add_argument("--plot-from", type=Path, default=None,
                        help="redraw the figure of an earlier run from its JSON (written beside it as .png); no training")
    return parser.parse_args(argv)


def curve(train_set, test, trigger: Trigger, rate: float, settings: dict[str, Any], label: str,
          readout: bool = False) -> list[dict[str, float]]:
    """Train one victim; read its encoder every `eval_every` epochs."""
    triggered = triggered_test_set(test, trigger, settings["target_class"], settings["seed"])
    feature_sets = readout_sets(train_set, test, triggered, trigger, rate, settings) if readout else None

    def evaluate(encoder, epoch: int) -> dict[str, float]:
        metrics, fit = evaluate_encoder(encoder, train_set.images, train_set.labels, test.images, test.labels,
                                        triggered.images, settings["target_class"], train_set.num_classes,
                                        seed=settings["seed"])
        row = {"knn_acc": metrics["knn"]["acc"], "knn_asr": metrics["knn"]["asr"],
               "linear_acc": metrics["linear"]["acc"], "linear_asr": metrics["linear"]["asr"]}
        if feature_sets is not None:
            row.update(read_trigger_feature(encoder, fit.probe, feature_sets, settings["target_class"]))
        print(f"{label} epoch {epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
        return row

    record = run_attack(train_set, test, trigger, mode="clean_label", poison_rate=rate, evaluate=evaluate, **settings)
    # The training loop stops on a non-finite loss, so every row's loss is finite (a NaN would read as ASR 1.0).
    columns = COLUMNS + (READOUT if feature_sets is not None else ())
    return [{k: row[k] for k in columns} for row in record.curves if "linear_asr" in row]


def readout_sets(train_set, test, triggered, trigger: Trigger, rate: float, settings: dict[str, Any]):
    """The four image sets of `trigger_readout`, or None for a victim without poisons (no offset to read).

    The poisons are the ones `run_attack` stamps: the same seeded choice, drawn again."""
    target = settings["target_class"]
    poisoned = poison_dataset(train_set, trigger, rate, target, "clean_label", settings["seed"])
    if not len(poisoned.indices):
        return None
    return (test.images[test.labels != target], triggered.images, poisoned.train.images[poisoned.indices],
            train_set.images[clean_targets(train_set.labels, poisoned.indices, target)])


def clean_targets(labels: np.ndarray, poisons: np.ndarray, target: int) -> np.ndarray:
    """Which training images are target-class images without the trigger: the readout's offset is measured from them."""
    mask = labels == target
    mask[poisons] = False
    return mask


def read_trigger_feature(encoder, probe, feature_sets, target: int) -> dict[str, float]:
    clean_test, triggered, poisons, clean_target = (extract_features(encoder, images) for images in feature_sets)
    out = trigger_readout(probe, clean_test, triggered, poisons, clean_target, target)
    target_direction = (clean_target.mean(0) - probe.mean.float()).norm()
    return {"offset_over_target": out["offset_norm"] / float(target_direction), **{k: out[k] for k in READOUT[1:]}}


def table(runs: list[dict[str, Any]]) -> str:
    """One row per reading; the readout's columns when any victim has them ("–" for a victim without poisons)."""
    readout = any(READOUT[0] in row for run in runs for row in run["rows"])
    columns = COLUMNS + (READOUT if readout else ())

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column)
        return "–" if value is None else f"{value:.0f}" if column == "epoch" else f"{value:.3f}"

    lines = ["| victim | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for run in runs:
        lines += [f"| {run['victim']} | " + " | ".join(cell(row, c) for c in columns) + " |" for row in run["rows"]]
    return "\n".join(lines)


def plot_runs(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """ASR (left) and ACC (right) against the epoch: kNN solid, probe dashed; the poisoned victim in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for run in runs:
        colour = "tab:gray" if run["victim"].startswith("clean") else "tab:red"
        epochs = [row["epoch"] for row in run["rows"]]
        for ax, measure in zip(axes, ("asr", "acc")):
            for reader, style in (("knn", "-"), ("linear", "--")):
                label = f"{run['victim']}, {'kNN' if reader == 'knn' else 'linear probe'}"
                ax.plot(epochs, [row[f"{reader}_{measure}"] for row in run["rows"]], style, color=colour, marker="o",
                        label=label)
    for ax, name in zip(axes, ("ASR (triggered non-target test images sent to the target)", "ACC (clean test images)")):
        ax.set(xlabel="epoch", ylabel=name.split(" ")[0], ylim=(0, 1), title=name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)


def _title(result: dict[str, Any]) -> str:
    run = result.get("_run", {})
    victim = run.get("victim", {})
    return (f"{victim.get('method', 'simclr')}, {run.get('trigger', '?')} trigger, target class {victim.get('target_class', '?')}, "
            f"{victim.get('epochs', '?')} epochs, read every {victim.get('eval_every', '?')}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.plot_from is not None:
        try:
            result = read_json(args.plot_from)
            plot_runs(result["runs"], args.plot_from.with_suffix(".png"), _title(result))
        except (ConfigError, KeyError, TypeError) as exc:
            raise SystemExit(f"--plot-from {args.plot_from}: not a result of this bench ({exc})") from None
        print(f"written {args.plot_from.with_suffix('.png')}")
        return result
    command = command_line(argv)
    params = params_from_args(args)
    train_set, test = params_splits(params)
    device = pick_device(args.device)
    settings = {**victim_settings(params, args.method), "epochs": args.epochs, "eval_every": args.every, "device": device,
                "progress": not args.quiet}
    if args.width:
        settings["width"] = args.width
    rate = float(params.get("poison_rate", 0.05)) if args.rate is None else args.rate
    target = settings["target_class"]
    validate_poison(train_set.labels, train_set.num_classes, rate, target, "clean_label")  # before the fit and training
    if args.readout and rate > 0:
        poisons = choose_poison_indices(train_set.labels, rate, target, "clean_label", settings["seed"])
        if not clean_targets(train_set.labels, poisons, target).any():
            raise ConfigError("--rate", rate, "a rate that leaves some target images clean, with --readout (its offset "
                                              "is measured from them)")
    if args.trigger_params is None:
        trigger = load_trigger(args.trigger)
    else:
        trigger = build_trigger(args.trigger_name, args.trigger_params, seed=settings["seed"], image_size=train_set.images.shape[1])
        fit = fit_trigger(trigger, train_set.images, train_set.labels, settings["target_class"], settings["seed"], device,
                          progress=not args.quiet)
        if fit is not None:
            print("trigger fit, last round: " + json.dumps(fit["history"][-1]), flush=True)
        if args.save_trigger:
            save_trigger(trigger, args.save_trigger)
    started = time.perf_counter()
    victims = [(f"poisoned ({rate:g})", rate, "poisoned")] + ([("clean (0)", 0.0, "clean")] if args.clean else [])
    runs: list[dict[str, Any]] = []
    for victim, victim_rate, label in victims:
        rows = curve(train_set, test, trigger, victim_rate, settings, label, readout=args.readout)
        runs.append({"victim": victim, "rows": rows})
        # Written after every victim, so a run stopped by a time limit keeps the victims it finished.
        result = {"runs": runs, "_run": {"command": command, "env": environment(device), "trigger": trigger.name,
                                         "trigger_params": trigger.params, "seconds": time.perf_counter() - started,
                                         "victim": {k: v for k, v in settings.items() if k != "device"},
                                         "complete": len(runs) == len(victims)}}
        write_results(args.out, result, table(runs))
    print(table(runs))
    return result


def write_results(out: Path, result: dict[str, Any], rows_table: str) -> None:
    """The JSON, the figure and the markdown table of the victims read so far."""
    run = result["_run"]
    write_json(out, result)
    plot_runs(result["runs"], out.with_suffix(".png"), _title(result))
    out.with_suffix(".md").write_text(
        results_header("ASR as the encoder matures", run["command"], run["env"])
        + f"Victim: {run['victim']['method']}\n\n"
        f"Trigger: {run['trigger']} {run['trigger_params']}\n\n"
        + ("" if run["complete"] else "**Incomplete: the run stopped before its last victim.**\n\n")
        + f"{rows_table}\n")


if __name__ == "__main__":
    run_script(main)
