"""How far each downstream reader can go: ASR against the reader's own ceiling, on the pipeline's outputs.

A triggered image of another class can hardly be read as the target more
often than a *triggered image of the target class itself* is. That rate is
the reader's ceiling for this encoder (a yardstick, not a strict bound), and
it is well below 1 when the encoder separates the target only partly. Per reader, on the test split:

- recall: clean target-class images read as the target;
- ceiling: the same images with the trigger, read as the target;
- natural: clean non-target images read as the target;
- ASR: triggered non-target images read as the target (the pipeline's ASR);
- ASR / ceiling: how much of the reachable reading the backdoor gets.

Readers: the pipeline's weighted kNN (its k and temperature, bank = the clean
labelled training set), its linear probe (data/finetune/probe.safetensors),
and a nearest-class-centroid classifier on the same bank, which reads like
kNN but with the whole class as one neighbour. For kNN the table also gives
the target's share of the k neighbours.

Where the trigger moves images, by neighbours: the share of *poisoned* images
among the k nearest images of the victim's own training set (the set it was
pretrained on), for clean and for triggered non-target test images, against
the poison rate; and the target's share among the k nearest clean images of
the poisoned training images, against that of the target images left clean.
A trigger that sends images next to the poisons, whose own clean neighbours
are no more target-like than the clean target images', moves them towards a
place the clean bank does not hold.

Run in the repository root after `dvc repro` (it reads data/ and params.yaml):

    python bench/readout_ceiling.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cba.analysis.readout import neighbour_shares  # noqa: E402
from cba.env import command_line, environment, where_it_ran  # noqa: E402
from cba.errors import BenchParser, run_script
from cba.evaluate import extract_features, knn_predict  # noqa: E402
from cba.io import write_json  # noqa: E402

GROUPS = ("recall", "ceiling", "natural", "asr")
NEEDED = ("data/pretrain/encoder.safetensors", "data/finetune/probe.safetensors", "data/trigger",
          "data/poisoned/clean_train.safetensors", "data/poisoned/test.safetensors",
          "data/poisoned/train.safetensors", "data/poisoned/manifest.parquet")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("."), help="a repository where `dvc repro` has run")
    parser.add_argument("--out", type=Path, default=Path("bench/results/readout_ceiling.json"))
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 50, 200, 500],
                        help="neighbour counts for the kNN-by-k table (the pipeline's k and temperature stay the reader above)")
    args = parser.parse_args(argv)
    if min(args.ks) < 1:
        parser.error(f"--ks {min(args.ks)}: every k must be at least 1")
    missing = [p for p in ("params.yaml", *NEEDED) if not (args.root / p).exists()]
    if missing:
        parser.error(f"--root {args.root}: no {missing[0]}; run `dvc repro` there first")
    return args


def centroid_predict(bank: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Nearest class mean by cosine (every class present in the bank)."""
    bank = F.normalize(bank.float(), dim=1)
    means = torch.stack([F.normalize(bank[labels == c].mean(0), dim=0) for c in range(num_classes)])
    return (F.normalize(queries.float(), dim=1) @ means.T).argmax(1)


def neighbour_share(bank: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, target: int, k: int) -> float:
    """Mean share of the target class among each query's k nearest bank images (cosine)."""
    return float(neighbour_shares(queries, bank, labels == target, k).mean())


def poison_neighbours(train: torch.Tensor, poisoned: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                      clean_queries: torch.Tensor, triggered_queries: torch.Tensor, train_is_target: torch.Tensor,
                      target: int, k: int) -> dict[str, float]:
    """Where the trigger moves images, by neighbours (features of the victim's training set `train`, whose
    `poisoned` rows carry the trigger; `bank` is the clean labelled set kNN reads)."""
    if not poisoned.any():
        return {}
    is_poison = poisoned.long()
    return {
        "poison_rate": float(poisoned.float().mean()),
        "clean": neighbour_share(train, is_poison, clean_queries, 1, k),
        "triggered": neighbour_share(train, is_poison, triggered_queries, 1, k),
        "target_near_poisons": neighbour_share(bank, bank_labels, train[poisoned], target, k),
        "target_near_clean_target": neighbour_share(bank, bank_labels, train[~poisoned & train_is_target], target, k),
    }


def reading_rates(readers: dict[str, Callable[[torch.Tensor], torch.Tensor]], groups: dict[str, torch.Tensor],
                  target: int) -> dict[str, dict[str, float]]:
    """For each reader, the share of each group's features it labels `target`, and ASR over the ceiling."""
    rows = {}
    for name, read in readers.items():
        row = {group: float((read(groups[group]) == target).float().mean()) for group in GROUPS}
        row["asr_over_ceiling"] = row["asr"] / row["ceiling"] if row["ceiling"] > 0 else float("nan")
        rows[name] = row
    return rows


def knn_by_k(bank: torch.Tensor, labels: torch.Tensor, clean_test: torch.Tensor, test_labels: torch.Tensor,
             triggered: torch.Tensor, target: int, num_classes: int, ks: list[int], temperature: float) -> list[dict]:
    """kNN ACC and ASR at each k: does the kNN figure hinge on the evaluation's k?"""
    rows = []
    for k in ks:
        acc = float((knn_predict(bank, labels, clean_test, num_classes, k, temperature) == test_labels).float().mean())
        asr = float((knn_predict(bank, labels, triggered, num_classes, k, temperature) == target).float().mean())
        rows.append({"k": k, "acc": acc, "asr": asr})
    return rows


def measure(root: Path, ks: list[int] = (200,)) -> dict[str, Any]:
    from cba.attack import reader_options
    from cba.data.io import load_imageset
    from cba.models.io import load_encoder
    from cba.poison import triggered_test_set
    from cba.probe import load_probe
    from cba.readings import pipeline_params, pipeline_sets
    from cba.triggers import load_trigger

    params = pipeline_params(root)
    target, seed = int(params.get("target_class", 0)), int(params.get("seed", 0))
    options = reader_options(params)
    k, temperature = options["k"], options["temperature"]
    encoder = load_encoder(root / NEEDED[0])
    probe = load_probe(root / NEEDED[1])
    trigger = load_trigger(root / NEEDED[2])
    clean, test = pipeline_sets(root)
    train = load_imageset(root / NEEDED[5])
    poisoned = torch.from_numpy(pd.read_parquet(root / NEEDED[6])["poisoned"].to_numpy(dtype=bool, copy=True))
    bank, bank_labels = extract_features(encoder, clean.images), torch.as_tensor(clean.labels).long()
    is_target = test.labels == target
    groups = {
        "recall": extract_features(encoder, test.images[is_target]),
        "ceiling": extract_features(encoder, trigger.apply(test.images[is_target], rng=np.random.default_rng([seed, 1]))),
        "natural": extract_features(encoder, test.images[~is_target]),
        "asr": extract_features(encoder, triggered_test_set(test, trigger, target, seed).images),  # the pipeline's ASR set
    }
    with torch.no_grad():
        readers = {
            f"kNN (k {k}, T {temperature})": lambda f: knn_predict(bank, bank_labels, f, clean.num_classes, k, temperature),
            "linear probe": lambda f: probe(f.float()).argmax(1),
            "nearest class centroid": lambda f: centroid_predict(bank, bank_labels, f, clean.num_classes),
        }
        rows = reading_rates(readers, groups, target)
        shares = {group: neighbour_share(bank, bank_labels, groups[group], target, k) for group in GROUPS}
        # The victim's training set is the clean one but for the poisoned rows: only those need the encoder again.
        train_features = bank.clone()
        train_features[poisoned] = extract_features(encoder, train.images[poisoned.numpy()])
        near_poisons = poison_neighbours(train_features, poisoned, bank, bank_labels,
                                         groups["natural"], groups["asr"], torch.as_tensor(train.labels) == target, target, k)
        all_test = torch.cat([groups["recall"], groups["natural"]])
        all_labels = torch.as_tensor(np.concatenate([test.labels[is_target], test.labels[~is_target]])).long()
        by_k = knn_by_k(bank, bank_labels, all_test, all_labels, groups["asr"], target, clean.num_classes, list(ks), temperature)
    return {"target": target, "target_name": clean.classes[target], "k": k, "temperature": temperature, "rows": rows,
            "knn_neighbour_share": shares, "knn_by_k": by_k, "poison_neighbours": near_poisons}


def table(result: dict[str, Any]) -> str:
    lines = ["| reader | recall (clean target) | ceiling (triggered target) | natural | ASR | ASR / ceiling |",
             "|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['recall']:.3f} | {r['ceiling']:.3f} | {r['natural']:.3f} | {r['asr']:.3f} "
                     f"| {r['asr_over_ceiling']:.2f} |")
    s = result["knn_neighbour_share"]
    lines.append(f"\nTarget's share of the {result['k']} nearest clean training images: clean target {s['recall']:.3f}, "
                 f"triggered target {s['ceiling']:.3f}, clean non-target {s['natural']:.3f}, "
                 f"triggered non-target {s['asr']:.3f}.")
    near = result.get("poison_neighbours") or {}
    if near:
        lines.append(f"\nPoisons' share of the {result['k']} nearest images of the victim's training set: clean non-target "
                     f"{near['clean']:.3f}, triggered non-target {near['triggered']:.3f} (poison rate {near['poison_rate']:.3f}). "
                     f"Target's share of the {result['k']} nearest clean images: of the poisons {near['target_near_poisons']:.3f}, "
                     f"of the target images left clean {near['target_near_clean_target']:.3f}.")
    lines += [f"\nkNN at other k (temperature {result['temperature']}):\n", "| k | ACC | ASR |", "|---|---|---|"]
    lines += [f"| {row['k']} | {row['acc']:.3f} | {row['asr']:.3f} |" for row in result["knn_by_k"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = command_line(argv)
    result = {"command": command, "env": environment("cpu"), **measure(args.root, args.ks)}
    write_json(args.out, result)
    text = (f"# Each reader's ceiling: ASR against the reading of triggered target-class images\n\n"
            f"Command: `{command}` (target {result['target_name']})\n\nRun on {where_it_ran(result['env'])}.\n\n"
            f"{table(result)}\n")
    args.out.with_suffix(".md").write_text(text)
    print(table(result))
    return result


if __name__ == "__main__":
    run_script(main)
