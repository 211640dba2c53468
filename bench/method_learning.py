"""Does a pretraining method learn the clean task at the pipeline's budget, and which knob moves it?

A method that learns nothing of the clean task cannot carry a backdoor worth reading, so its row in
`bench/trl_compare.py` says nothing about the paper's claims. This bench asks the earlier question on
clean data (no trigger, no poisons): for each variant of the victim's recipe it trains the method from the
pipeline's initial encoder and reads, every `--every` epochs and at the end,

- **kNN ACC**: the pipeline's kNN (`finetune.knn`) with a bank of `--bank-size` clean labelled training
  images, on the whole test set; the row `epoch 0` is the untrained encoder, the floor to clear;
- **weights' cosine to init**: `cba.analysis.dynamics.cosine_to_init`, 1 where no layer turned;
- the epoch's mean training loss.

A variant is a YAML mapping of changes to the recipe params.yaml gives `cba pretrain`:

- `lr`, `batch_size`, `weight_decay`, `min_scale` (the crop's smallest area);
- any key of the method's own section (`pretrain.<method>`), such as `ema_momentum`;
- `predictor_gain: g`: the predictor's gradients times g, which under SGD is its learning rate times g
  (SimSiam's and DirectPred's observation that the predictor should adapt faster than the encoder);
- `colour: gray` (every view grayscale: colour cannot tell two views apart) or `colour: s` (colour jitter
  at s times SimCLR's strengths, hue capped at 0.5).

    OMP_NUM_THREADS=2 python bench/method_learning.py --method byol --epochs 10 \\
        --variants '{}' '{lr: 0.3}' '{ema_momentum: 0.9}' '{colour: gray}'    # about 80 s a variant on two cores

Writes `--out` (markdown) and the same path with `.json`.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from cba.analysis.dynamics import cosine_to_init
from cba.attack import initial_backbone, params_splits, reader_options, victim_settings
from cba.augment import build_augment
from cba.env import command_line, environment, results_header
from cba.errors import BenchParser, run_script
from cba.evaluate import accuracy, extract_features, knn_predict, pick_device
from cba.io import write_json
from cba.params_file import add_params_options, params_from_args
from cba.ssl import METHODS, build_method
from cba.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
RECIPE_KEYS = ("lr", "batch_size", "weight_decay", "min_scale")
BENCH_KEYS = ("predictor_gain", "colour")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_params_options(parser, REPO / "params.yaml",
                       help="the data set, seed, backbone and victim recipe to start from")
    parser.add_argument("--method", default="byol", help=f"one of {', '.join(METHODS.names())}")
    parser.add_argument("--variants", nargs="+", type=yaml.safe_load, default=[{}], metavar="YAML",
                        help="changes to the recipe, one mapping per variant ('{}' is the recipe as it is)")
    parser.add_argument("--epochs", type=int, default=None, help="default: pretrain.epochs")
    parser.add_argument("--every", type=int, default=5, help="read kNN ACC every this many epochs")
    parser.add_argument("--bank-size", type=int, default=5000, help="clean labelled images in the kNN bank")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--out", type=Path, default=Path("bench/results/method_learning.md"))
    args = parser.parse_args(argv)
    args.pipeline = params_from_args(args, parser)
    if args.method not in METHODS:
        parser.error(f"--method {args.method!r}: choose one of {', '.join(METHODS.names())}")
    args.recipe, args.readers = victim_settings(args.pipeline, args.method), reader_options(args.pipeline)
    recipe = args.recipe
    for variant in args.variants:  # every variant checked before the first one trains
        if not isinstance(variant, dict):
            parser.error(f"--variants {variant!r}: a YAML mapping is needed, e.g. '{{lr: 0.3}}'")
        unknown = sorted(set(variant) - set(RECIPE_KEYS) - set(BENCH_KEYS) - set(recipe["hparams"]))
        if unknown:
            allowed = ", ".join([*RECIPE_KEYS, *BENCH_KEYS, *recipe["hparams"]])
            parser.error(f"--variants {variant!r}: unknown {', '.join(unknown)}; allowed: {allowed}")
        colour = variant.get("colour")
        if colour is not None and colour != "gray" and not (isinstance(colour, (int, float)) and colour >= 0):
            parser.error(f"--variants {variant!r}: colour must be gray or a jitter strength >= 0")
    if (args.epochs is not None and args.epochs < 1) or args.every < 1 or args.bank_size < 1:
        parser.error("--epochs, --every and --bank-size must be positive")
    return args


def with_colour(augment: nn.Sequential, colour: Any) -> nn.Sequential:
    """The SSL pipeline (crop, flip, jitter, grayscale) with its colour changed as the variant says."""
    import kornia.augmentation as K

    crop, flip, jitter, gray = augment
    if colour == "gray":
        return nn.Sequential(crop, flip, jitter, K.RandomGrayscale(p=1.0))
    s = float(colour)
    return nn.Sequential(crop, flip, K.ColorJitter(0.4 * s, 0.4 * s, 0.4 * s, min(0.1 * s, 0.5), p=0.8), gray)


def scale_predictor_gradients(method: nn.Module, gain: float) -> None:
    predictor = getattr(method, "predictor", None)
    if predictor is None:
        raise SystemExit(f"predictor_gain {gain}: the method {type(method).__name__} has no predictor")
    for p in predictor.parameters():
        p.register_hook(lambda grad: grad * gain)


def run_variant(variant: dict[str, Any], args: argparse.Namespace, train_set, test,
                device: torch.device) -> dict[str, Any]:
    recipe = args.recipe
    hparams = {**recipe["hparams"], **{k: v for k, v in variant.items() if k in recipe["hparams"]}}
    chosen = {key: variant.get(key, recipe[key]) for key in RECIPE_KEYS}
    seed, epochs = recipe["seed"], args.epochs or recipe["epochs"]
    initial = initial_backbone(recipe["backbone"], recipe["width"], seed)
    # The copy leaves torch's generator where a second build would: the heads draw the same weights.
    method = build_method(args.method, copy.deepcopy(initial), num_classes=train_set.num_classes, **hparams)
    lr = chosen["lr"] if chosen["lr"] is not None else method.default_lr
    if variant.get("predictor_gain") is not None:
        scale_predictor_gradients(method, float(variant["predictor_gain"]))
    augment = build_augment(method.augmentation, train_set.images.shape[1], recipe["per_batch"], chosen["min_scale"])
    if variant.get("colour") is not None:
        augment = with_colour(augment, variant["colour"])
    options = args.readers
    bank = np.random.default_rng(seed).permutation(len(train_set))[: args.bank_size]

    def knn_acc(encoder: nn.Module, epoch: int) -> dict[str, float]:
        preds = knn_predict(extract_features(encoder, train_set.images[bank]), torch.as_tensor(train_set.labels[bank]),
                            extract_features(encoder, test.images), train_set.num_classes, options["k"],
                            options["temperature"])
        return {"knn_acc": accuracy(preds, test.labels), "cosine_to_init": cosine_to_init(encoder, initial)}

    started = time.perf_counter()
    curves = [{"epoch": 0, **knn_acc(initial, 0)}]
    config = TrainConfig(epochs=epochs, batch_size=int(chosen["batch_size"]), lr=float(lr),
                         weight_decay=float(chosen["weight_decay"]), warmup_epochs=min(2, epochs // 4), seed=seed,
                         eval_every=args.every)
    result = train(method, train_set.images, train_set.labels, augment, config, device, evaluate=knn_acc,
                   progress=False)
    curves += [{k: row[k] for k in ("epoch", "loss", "knn_acc", "cosine_to_init")} for row in result.curves
               if "knn_acc" in row]
    row = {"variant": variant, "lr": float(lr), "curves": curves, "seconds": time.perf_counter() - started}
    readings = ", ".join(f"epoch {c['epoch']} {c['knn_acc']:.3f}" for c in curves)
    print(f"{args.method} {variant}: {readings}", flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    epochs = [c["epoch"] for c in rows[0]["curves"]]
    lines = ["| variant | lr | " + " | ".join(f"kNN ACC, epoch {e}" for e in epochs)
             + " | final loss | weights' cosine to init | seconds |", "|---|---|" + "---|" * (len(epochs) + 3)]
    for r in rows:
        last = r["curves"][-1]
        lines.append(f"| `{yaml.safe_dump(r['variant'], default_flow_style=True).strip()}` | {r['lr']:g} | "
                     + " | ".join(f"{c['knn_acc']:.3f}" for c in r["curves"])
                     + f" | {last['loss']:.3f} | {last['cosine_to_init']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = command_line(argv)
    device = pick_device(args.device)
    train_set, test = params_splits(args.pipeline)
    rows = [run_variant(variant, args, train_set, test, device) for variant in args.variants]
    data = args.pipeline.get("data") or {}
    result = {"method": args.method, "rows": rows,
              "_run": {"command": command, "env": environment(device),
                       "data": {"name": data.get("name", "synthetic"), "options": data.get("options") or {}},
                       "recipe": args.recipe}}
    write_json(args.out.with_suffix(".json"), result)
    args.out.write_text(results_header(f"Does {args.method} learn the clean task at this budget", command,
                                       result["_run"]["env"])
                        + f"Data: {result['_run']['data']['name']} {result['_run']['data']['options']}; clean "
                        "training set, no trigger. Epoch 0: the untrained encoder.\n\n" + table(rows) + "\n")
    print(table(rows))
    return result


if __name__ == "__main__":
    run_script(main)
