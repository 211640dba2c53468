"""Compare every pretraining method under one backdoor: the paper's claims 1 and 2 side by side.

Every method in `cba.ssl.METHODS` (simclr, byol, mocov2, simsiam, supervised)
trains on the SAME data with the SAME trigger at the SAME poison budget (a
fraction of the whole training set). Unless a flag says otherwise these are the
pipeline's: params.yaml's data set and sizes, trigger, target class, poison
rate, seed, epochs, width, batch size, augmentation and each method's section,
so the simclr row is the default pipeline's attack.
The SSL methods get the clean-label attack (their threat model: pretraining
never sees labels); the supervised baseline gets the dirty-label BadNets attack
the paper compares against (or clean-label with --supervised-mode clean_label).

Per method, one row:

- ACC / ASR by kNN and by a linear probe fitted on clean labels (for
  supervised also its own, poisoned, head). Did the attack work at all?
- max loss AUROC (epoch): the best, over epochs, AUROC of "low per-sample loss"
  as a detector of poisoned training samples. This is what loss-based defenses
  such as ABL exploit. Claim 1: near 1 early for the supervised attack (the
  poisoned loss collapses first), near 0.5 for contrastive attacks (poisoned
  and clean losses fall alike).
- feature separability AUROC and silhouette: how well a cross-validated linear
  classifier, and the cosine silhouette, tell poisoned training features from
  clean target-class features. Claim 2: near 1 / clearly positive for the
  supervised attack (its own cluster), near 0.5 / about 0 for contrastive ones
  (inside the target cluster). Feature-space defenses (AC, SCAn, spectral
  signatures) rely on that separability.
- backdoor epoch / clean epoch: the first evaluated epoch with kNN ASR > 50 %,
  and with kNN ACC >= 90 % of its final value. Backdoor well before clean =
  learned on its own (supervised); together or never = entangled.

Read a row's separability and loss AUROC only together with its ASR: a method
the backdoor did not take hold in is trivially "entangled". The CPU-sized
pipeline's sizes take about 30 minutes on two idle cores; shrink with
--train-size/--epochs.

    OMP_NUM_THREADS=2 python bench/trl_compare.py --quiet          # the pipeline's settings
    python bench/trl_compare.py --train-size 300 --test-size 100 --epochs 2 --width 4   # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import torch

from cba.analysis import entanglement_metrics, summarize_dynamics
from cba.env import command_line, environment, where_it_ran
from cba.attack import initial_backbone, read_pipeline_args, params_splits, run_attack, victim_settings
from cba.record import classifier_acc_asr
from cba.defenses.downstream_ft import record_probe
from cba.analysis.dynamics import cosine_to_init
from cba.errors import BenchParser, run_script
from cba.evaluate import evaluate_encoder, extract_features, knn_backdoor_metrics, pick_device
from cba.io import atomic_path, write_json
from cba.models import BACKBONES
from cba.params_file import add_params_options
from cba.poison import triggered_test_set
from cba.ssl import METHODS
from cba.triggers import TRIGGERS, build_trigger
from cba.triggers.fitting import fit_trigger

COLUMNS = [
    ("method", "method"), ("mode", "poison"), ("lr", "lr"), ("knn_acc", "kNN ACC"), ("knn_asr", "kNN ASR"),
    ("init_knn_acc", "kNN ACC at init"), ("init_cosine", "weights' cosine to init"),
    ("probe_acc", "probe ACC"), ("probe_asr", "probe ASR"), ("head_acc", "head ACC"), ("head_asr", "head ASR"),
    ("max_loss_auroc", "max loss AUROC (epoch)"), ("separability_auroc", "feature sep. AUROC"),
    ("silhouette", "silhouette"), ("backdoor_epoch", "backdoor epoch"), ("clean_epoch", "clean epoch"),
    ("seconds", "time s"),
]


PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # None: the pipeline's value from --params (cba.attack.pipeline_defaults)
    add_params_options(parser, PARAMS)
    parser.add_argument("--train-size", type=int, default=None, help="training images (default: data.options')")
    parser.add_argument("--test-size", type=int, default=None, help="test images (default: data.options')")
    parser.add_argument("--epochs", type=int, default=None, help="default: pretrain.epochs")
    parser.add_argument("--width", type=int, default=None, help="backbone width (default: pretrain.width)")
    parser.add_argument("--backbone", default="convnet", choices=BACKBONES.names())
    parser.add_argument("--trigger", default=None, choices=TRIGGERS.names(), help="trigger (default: params.yaml's trigger.name)")
    parser.add_argument("--trigger-params", type=yaml.safe_load, default=None,
                        help="the trigger's parameters as YAML, e.g. '{alpha: 0.2}' (default: params.yaml's trigger.params "
                             "for params.yaml's trigger, else the trigger's own defaults)")
    parser.add_argument("--poison-rate", type=float, default=None, help="fraction of the whole training set")
    parser.add_argument("--target-class", type=int, default=None)
    parser.add_argument("--methods", default="all", help=f"comma-separated subset of {','.join(METHODS.names())}, or all")
    parser.add_argument("--supervised-mode", default="dirty_label", choices=("dirty_label", "clean_label"),
                        help="threat model of the supervised baseline (SSL methods are always clean_label)")
    protocol = parser.add_mutually_exclusive_group()
    protocol.add_argument("--per-batch", dest="per_batch", action="store_true",
                          help="one augmentation draw per batch")
    protocol.add_argument("--per-sample", dest="per_batch", action="store_false",
                          help="augmentation parameters drawn per sample")
    parser.set_defaults(per_batch=None)  # None: pretrain.augmentation.per_batch
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--ssl-lr", type=float, default=None,
                        help="SGD learning rate of every SSL method (default: each method's own, as pretrain.lr: auto)")
    parser.add_argument("--min-scale", type=float, default=None, help="smallest RandomResizedCrop area")
    parser.add_argument("--supervised-lr", type=float, default=None, help="default: the supervised method's own")
    parser.add_argument("--queue-size", type=int, default=None,
                        help="MoCo queue (default: pretrain.mocov2's; capped at the training set size)")
    parser.add_argument("--eval-every", type=int, default=3, help="kNN ACC/ASR every k epochs, for the learning epochs")
    parser.add_argument("--eval-bank-size", type=int, default=2000, help="clean labelled images in the kNN bank during training")
    parser.add_argument("--max-target-points", type=int, default=2000,
                        help="cap on clean target-class samples in the separability metrics")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--out", type=Path, default=Path("bench/results/trl_compare.md"))
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress bars")
    args = parser.parse_args(argv)
    read_pipeline_args(parser, args)
    args.trigger, args.trigger_params = pipeline_trigger(args.pipeline, args.trigger, args.trigger_params)
    names = METHODS.names() if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        parser.error(f"--methods: unknown {unknown or args.methods!r}; choose from {', '.join(METHODS.names())} or all")
    args.method_names = names
    return args


def pipeline_trigger(pipeline: dict, name: str | None, params: dict | None) -> tuple[str, dict]:
    """The trigger and its params: as given, else params.yaml's (for its own trigger), else the defaults."""
    section = pipeline.get("trigger") or {}
    name = name or section.get("name", "ctrl")
    if params is None:
        params = dict(section.get("params") or {}) if name == section.get("name") else {}
    return name, params


def run_method(name: str, args: argparse.Namespace, train_set, test, triggered, trigger,
               device: torch.device) -> dict[str, Any]:
    """Poison, train with kNN curves (`cba.attack.run_attack`), then measure one row of the table."""
    started = time.perf_counter()
    target, seed = args.target_class, args.seed
    mode = args.supervised_mode if name == "supervised" else "clean_label"
    # Each method's options as the pipeline sets them in params.yaml (pretrain.<method>).
    hparams = victim_settings(args.pipeline, name)["hparams"]
    if name == "mocov2":
        hparams["queue_size"] = min(args.queue_size or hparams.get("queue_size", 4096), len(train_set))
    bank = np.random.default_rng(seed).permutation(len(train_set))[: args.eval_bank_size]

    def monitor(encoder: torch.nn.Module, epoch: int) -> dict[str, float]:
        row = knn_backdoor_metrics(encoder, train_set.images[bank], train_set.labels[bank], test.images, test.labels,
                                   triggered.images, target, train_set.num_classes)
        print(f"  {name} epoch {epoch}: kNN ACC {row['knn_acc']:.3f} ASR {row['knn_asr']:.3f}", flush=True)
        return row

    initial = initial_backbone(args.backbone, args.width, seed)  # the encoder `run_attack` starts from
    at_init = monitor(initial, 0)
    lr = (args.supervised_lr if METHODS.get(name).uses_labels else args.ssl_lr) or METHODS.get(name).default_lr
    print(f"== {name}: {mode}, {round(args.poison_rate * len(train_set))} poisoned of {len(train_set)}, lr {lr}", flush=True)
    record = run_attack(train_set, test, trigger, method=name, mode=mode, poison_rate=args.poison_rate, target_class=target,
                        backbone=args.backbone, width=args.width, epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                        seed=seed, hparams=hparams, per_batch=args.per_batch, min_scale=args.min_scale,
                        device=device, progress=not args.quiet,
                        eval_every=args.eval_every, evaluate=monitor)
    mask = record.poisoned

    metrics, _ = evaluate_encoder(record.encoder, train_set.images, train_set.labels, test.images, test.labels,
                                  triggered.images, target, train_set.num_classes,
                                  triggered_labels=triggered.labels, seed=seed, probe=record_probe(record))
    row: dict[str, Any] = {
        "method": name, "mode": mode, "lr": lr, "knn_acc": metrics["knn"]["acc"], "knn_asr": metrics["knn"]["asr"],
        "probe_acc": metrics["linear"]["acc"], "probe_asr": metrics["linear"]["asr"],
        # Did the encoder learn at all: the same kNN on the untrained encoder, and how far its weights turned.
        "init_knn_acc": at_init["knn_acc"], "init_cosine": cosine_to_init(record.encoder, initial),
    }
    if name == "supervised":  # its own (poisoned) head, beside the clean-label probe
        head = classifier_acc_asr(record.classifier, record)
        row.update(head_acc=head["acc"], head_asr=head["asr"])
    dynamics = summarize_dynamics(record.losses, record.curves)
    row.update({k: dynamics[k] for k in ("max_loss_auroc", "max_loss_auroc_epoch", "final_loss_auroc",
                                         "backdoor_epoch", "clean_epoch")})

    # Entanglement on the training images the victim saw: every poisoned one against clean target-class ones.
    clean_target = np.flatnonzero(~mask & (train_set.labels == target))
    if len(clean_target) > args.max_target_points:
        clean_target = np.random.default_rng([seed, 0xE47]).choice(clean_target, args.max_target_points, replace=False)
    rows = np.sort(np.concatenate([np.flatnonzero(mask), clean_target]))
    features = extract_features(record.encoder, record.train.images[rows]).numpy()
    row.update(entanglement_metrics(features, mask[rows], train_set.labels[rows], target, seed=seed))
    row["seconds"] = time.perf_counter() - started
    row["curves"] = record.curves
    print(f"== {name} done in {row['seconds']:.0f}s: kNN ACC {row['knn_acc']:.3f} ASR {row['knn_asr']:.3f}, "
          f"max loss AUROC {_fmt(row['max_loss_auroc'])}, feature sep. AUROC {_fmt(row['separability_auroc'])}", flush=True)
    return row


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _cell(row: dict[str, Any], key: str) -> str:
    if key == "max_loss_auroc" and row.get(key) is not None:
        return f"{_fmt(row[key])} ({row['max_loss_auroc_epoch']})"
    if key == "seconds":
        return f"{row[key]:.0f}"
    if key == "lr":
        return f"{row[key]:g}"
    return _fmt(row.get(key))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row, key) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("method_names", "pipeline")}
    settings["data"] = (args.pipeline.get("data") or {}).get("name", "synthetic")
    settings["methods"] = ",".join(args.method_names)
    settings["augmentation_protocol"] = "per_batch" if args.per_batch else "per_sample"
    return settings


def report(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device, command: str) -> str:
    settings = settings_of(args)
    env = environment(device)
    return "\n".join([
        "# TRL comparison: entangled learning and features across methods",
        "",
        f"Command: `{command}`",
        "",
        f"Run {dt.datetime.now().isoformat(timespec='seconds')} on {where_it_ran(env)}; data: {settings['data']}.",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())),
        "",
        markdown_table(rows),
        "",
        "How to read: loss AUROC ~1 (early) = poisoned samples are learned first and on their own (claim 1, "
        "supervised); ~0.5 = learned together with the clean task (contrastive). Feature sep. AUROC ~1 / "
        "silhouette > 0 = poisoned features form their own cluster (claim 2, supervised); ~0.5 / ~0 = inside "
        "the target class. Epochs: first evaluated epoch with kNN ASR > 50 % (backdoor) and with kNN ACC >= "
        "90 % of final (clean); – = never. Judge entanglement only where ASR shows the backdoor took hold. "
        "kNN ACC at init: the same kNN (and bank) on the encoder before its first step; weights' cosine to init: "
        "the mean cosine between each layer's trained and initial weights (1 = unchanged). A method whose kNN ACC "
        "stays near its init value did not learn the clean task, whether or not its weights moved.",
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = command_line(argv)
    device = pick_device(args.device)
    train_set, test = params_splits({**args.pipeline, "seed": args.seed}, train_size=args.train_size, test_size=args.test_size)
    trigger = build_trigger(args.trigger, args.trigger_params or {}, seed=args.seed, image_size=train_set.images.shape[1])
    # A learned trigger is fitted once, on the attacker's share of this training set, and shared by every method.
    fit_trigger(trigger, train_set.images, train_set.labels, args.target_class, args.seed, device, progress=not args.quiet)
    triggered = triggered_test_set(test, trigger, args.target_class, args.seed)
    print(f"trl_compare: {', '.join(args.method_names)} on {len(train_set)}/{len(test)} images, target {args.target_class}, "
          f"{args.trigger} {args.trigger_params or ''} at {args.poison_rate:g}, {args.epochs} epochs, {args.backbone} width {args.width}, "
          f"{'per-batch' if args.per_batch else 'per-sample'} augmentation, {device}", flush=True)
    rows = [run_method(name, args, train_set, test, triggered, trigger, device) for name in args.method_names]
    text = report(rows, args, device, command)
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    write_json(args.out.with_suffix(".json"), {"command": command, "settings": settings_of(args), "rows": rows})
    print()
    print(markdown_table(rows))
    print(f"\nwritten {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    run_script(main)
