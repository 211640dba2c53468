"""What the pipeline's readers get with no pretraining at all: the floor a trained encoder must clear.

`cba finetune` reads an encoder two ways, a kNN on the clean labelled training set and a converged
linear probe fitted on it (`cba.evaluate.evaluate_features`, with params.yaml's finetune section). This
bench reads the same data set the same way through feature extractors that learned nothing:

- `raw pixels`: the flattened image itself (values in [0, 1]), so the kNN is a cosine kNN in pixel space;
- `random init`: the pipeline's backbone (pretrain.backbone, pretrain.width) as `cba pretrain` initialises
  it before its first step (torch seeded with params.yaml's seed, the backbone built first);

and, beside them, every trained encoder named with `--encoder LABEL=PATH` (an `encoder.safetensors`
that cba wrote). An encoder's ACC says what pretraining taught it only as far as it clears these rows:
on an easy data set a random encoder's kNN already reads most of the test set. The same rows give the
trigger's ASR on readers that never saw a poison nor learned a feature, so a pattern's pull that needs
no learning at all shows here too.

    OMP_NUM_THREADS=2 python bench/reader_floor.py --encoder poisoned=data/pretrain/encoder.safetensors \\
        --encoder reference=data/reference/encoder.safetensors     # about two minutes on two cores

With the default paths, the two encoder rows repeat `metrics/finetune.json`'s readings (a check that the
bench reads as the pipeline does). Writes `--out` (JSON) and the same path with `.md`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from cba.attack import initial_backbone, params_splits, reader_options, victim_settings
from cba.env import command_line, environment, results_header
from cba.errors import BenchParser, ConfigError, run_script
from cba.evaluate import evaluate_features, feature_readers
from cba.io import write_json
from cba.models.io import load_encoder, named_encoder_paths
from cba.params_file import add_params_options, read_params
from cba.poison import triggered_test_set
from cba.triggers import load_trigger

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_params_options(parser, REPO / "params.yaml",
                       help="the data set, seed, target class, backbone and readers to use")
    parser.add_argument("--trigger", type=Path, default=REPO / "data" / "trigger",
                        help="a saved trigger folder (as `cba trigger` writes it): the ASR column's pattern")
    parser.add_argument("--encoder", action="append", default=[], metavar="LABEL=PATH",
                        help="a trained encoder to read beside the floor rows (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/reader_floor.json"))
    return parser.parse_args(argv)


def read_row(label: str, extract, train, test, triggered, target: int, options: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    metrics, _ = evaluate_features(extract(train.images), train.labels, extract(test.images), test.labels,
                                   extract(triggered.images), target, train.num_classes, **options)
    row = {"reader": label, **{name: {k: metrics[name][k] for k in ("acc", "asr", "natural_rate")}
                               for name in ("knn", "linear")}, "seconds": time.perf_counter() - started}
    print(f"{label}: kNN ACC {row['knn']['acc']:.3f} ASR {row['knn']['asr']:.3f}, "
          f"probe ACC {row['linear']['acc']:.3f} ASR {row['linear']['asr']:.3f}", flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| features read | kNN ACC / ASR (natural rate) | linear probe ACC / ASR (natural rate) |",
             "|---|---|---|"]
    for r in rows:
        cells = [f"{r[name]['acc']:.3f} / {r[name]['asr']:.3f} ({r[name]['natural_rate']:.3f})"
                 for name in ("knn", "linear")]
        lines.append(f"| {r['reader']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = command_line(argv)
    encoders = named_encoder_paths(args.encoder)
    try:
        params = read_params(args.params, args.sets)
        trigger = load_trigger(args.trigger)
        loaded = {label: load_encoder(path).eval() for label, path in encoders.items()}
        train, test = params_splits(params)  # a missing or corrupt data set is one line here, before any reading
    except (OSError, ConfigError) as exc:
        raise SystemExit(str(exc).splitlines()[0]) from None
    options = reader_options(params)
    target = int(params.get("target_class", 0))
    triggered = triggered_test_set(test, trigger, target, options["seed"])
    settings = victim_settings(params)
    untrained = {f"random init ({settings['backbone']}, width {settings['width']}, seed {settings['seed']})":
                 initial_backbone(settings["backbone"], settings["width"], settings["seed"]).eval()}
    readers = feature_readers({**untrained, **loaded})
    rows = [read_row(label, extract, train, test, triggered, target, options) for label, extract in readers.items()]
    data = params.get("data") or {}
    result = {"rows": rows, "_run": {
        "command": command, "env": environment(torch.device("cpu")),
        "data": {"name": data.get("name", "synthetic"), "options": data.get("options") or {}},
        "target_class": target, "trigger": {"name": trigger.name, "params": trigger.params},
        "encoders": {label: str(path) for label, path in encoders.items()}}}
    write_json(args.out, result)
    args.out.with_suffix(".md").write_text(
        results_header("What the readers get without pretraining", command, result["_run"]["env"])
        + f"Data: {result['_run']['data']['name']} {result['_run']['data']['options']}; target class {target}; "
        f"trigger {trigger.name}.\n\n{table(rows)}\n")
    print(table(rows))
    return result


if __name__ == "__main__":
    run_script(main)
