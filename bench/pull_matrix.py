"""Whose is the pull, the pattern's or the encoder's? Every pipeline's trigger read on every pipeline's encoder.

The reference victim (`cba reference`: the victim's recipe without poisons) reads the learned pattern as the
target on its own. That reading, the pull, is what the 3x rule holds the backdoor against, and it moves
with the seed and the processor. Two things move with them: the pattern the trigger stage fits and the
encoder the reference trains. This bench reads every trigger of several pipelines (each root after
`dvc repro finetune`) on every one of their encoders, so that the two can be told apart:

- the pull belongs to the pattern: a row (one trigger) reads alike on every encoder;
- it belongs to the encoder: a column (one encoder) reads alike whatever trigger it is shown.

Each encoder is read the pipeline's way (`cba finetune`): the weighted kNN and the converged linear probe,
fitted once on its own root's clean labelled set, on its own root's test set carrying each trigger, so the
diagonal is each pipeline's own reading. The spread of the log-odds of ASR is split two ways: the share
carried by the trigger (the row means), by the encoder (the column means) and by the rest (how one trigger
suits one encoder). `--victim poisoned` reads the poisoned victims instead: off the diagonal, a victim reads
a trigger it was not poisoned with.

    OMP_NUM_THREADS=2 python bench/pull_matrix.py --root <repo, seed 0> --root <repo, seed 1> --root ...
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cba.env import command_line, environment, results_header
from cba.data.io import load_imageset
from cba.errors import BenchParser, run_script
from cba.io import write_json
from cba.readings import ENCODERS, READERS, pipeline_files, pipeline_params, read_pipeline_triggers, unfinished
from cba.triggers import load_trigger


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, action="append", required=True,
                        help="a repository where `dvc repro finetune` has run; give two or more")
    parser.add_argument("--victim", choices=tuple(ENCODERS), default="reference",
                        help="which encoder of each root reads the triggers")
    parser.add_argument("--out", type=Path, default=Path("bench/results/pull_matrix.json"))
    args = parser.parse_args(argv)
    if len({root.resolve() for root in args.root}) < 2:
        parser.error(f"--root {args.root[0]}: give at least two different pipeline roots")
    refusal = unfinished(args.root, pipeline_files([ENCODERS[args.victim]]))
    if refusal:
        parser.error(refusal)
    return args


def pipeline(root: Path) -> dict[str, Any]:
    """What the bench needs of one root: its params, seed, target and trigger."""
    params = pipeline_params(root)
    return {"root": root, "params": params, "seed": int(params.get("seed", 0)),
            "target": int(params.get("target_class", 0)), "poison_rate": float(params.get("poison_rate", 0.0)),
            "trigger": load_trigger(root / "data/trigger")}


def label(run: dict[str, Any]) -> str:
    return f"seed {run['seed']}, rate {run['poison_rate']:g} ({run['root'].resolve().name})"


def read_every_trigger(run: dict[str, Any], triggers: list, victim: str) -> list[dict[str, float]]:
    """One encoder of `run` reading each trigger on its own test set: ASR per reader, and its clean ACC."""
    sets = read_pipeline_triggers(run["root"], run["params"], triggers, {victim: ENCODERS[victim]})[victim]
    return [{**{name: metrics[name]["asr"] for name in READERS}, **{f"{name}_acc": metrics[name]["acc"] for name in READERS}}
            for metrics in sets]


def split_variance(asr: np.ndarray, count: int) -> dict[str, float]:
    """Two-way split of the log-odds of a (trigger x encoder) ASR matrix: the shares of its total sum of
    squares carried by the rows (triggers), the columns (encoders) and the rest. ASR is kept half an image
    from 0 and 1 so that the log-odds stay finite."""
    p = np.clip(asr, 0.5 / count, 1 - 0.5 / count)
    logit = np.log(p / (1 - p))
    grand = logit.mean()
    rows, cols = logit.mean(axis=1) - grand, logit.mean(axis=0) - grand
    total = float(((logit - grand) ** 2).sum())
    by_row, by_col = float(logit.shape[1] * (rows ** 2).sum()), float(logit.shape[0] * (cols ** 2).sum())
    if total == 0:
        return {"trigger": 0.0, "encoder": 0.0, "rest": 0.0}
    return {"trigger": by_row / total, "encoder": by_col / total, "rest": max(total - by_row - by_col, 0.0) / total}


def pixel_correlation(triggers: list) -> list[list[float]] | None:
    """Pearson correlation of the additive patterns, pixel by pixel (None unless every trigger is one): how
    alike the patterns are as images, beside how alike the encoders read them."""
    if not all("pattern" in trigger.tensors() for trigger in triggers):
        return None
    flat = np.stack([trigger.tensors()["pattern"].numpy().ravel() for trigger in triggers])
    return np.corrcoef(flat).tolist()


def table(names: list[str], matrix: dict[str, np.ndarray], victim: str) -> str:
    head = " | ".join(f"{victim} encoder of {name}" for name in names)
    lines = [f"| trigger of | {head} | mean |", "|---|" + "---|" * (len(names) + 1)]
    for i, name in enumerate(names):
        cells = " | ".join(f"**{matrix['linear'][i, j]:.3f} / {matrix['knn'][i, j]:.3f}**" if i == j else
                           f"{matrix['linear'][i, j]:.3f} / {matrix['knn'][i, j]:.3f}" for j in range(len(names)))
        lines.append(f"| {name} | {cells} | {matrix['linear'][i].mean():.3f} / {matrix['knn'][i].mean():.3f} |")
    means = " | ".join(f"{matrix['linear'][:, j].mean():.3f} / {matrix['knn'][:, j].mean():.3f}" for j in range(len(names)))
    lines.append(f"| mean | {means} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    runs = [pipeline(root) for root in args.root]
    targets = {run["target"] for run in runs}
    if len(targets) > 1:
        raise SystemExit(f"--root: the pipelines aim at different targets ({sorted(targets)}); read triggers of one target")
    triggers = [run["trigger"] for run in runs]
    cells = [read_every_trigger(run, triggers, args.victim) for run in runs]  # cells[encoder][trigger]
    matrix = {name: np.array([[cells[j][i][name] for j in range(len(runs))] for i in range(len(runs))])
              for name in READERS}
    count = len(load_imageset(runs[0]["root"] / "data/poisoned/test.safetensors").labels)
    names = [label(run) for run in runs]
    split = {name: split_variance(matrix[name], count) for name in READERS}
    result = {"names": names, "victim": args.victim, "split": split, "pixel_correlation": pixel_correlation(triggers),
              "asr": {name: matrix[name].tolist() for name in READERS},
              "acc": {name: [cells[j][0][f"{name}_acc"] for j in range(len(runs))] for name in READERS}}
    command, env = command_line(argv), environment(torch.device("cpu"))
    write_json(args.out, {**result, "_run": {"command": command, "env": env, "roots": [str(r) for r in args.root]}})
    shares = "; ".join(f"{name}: trigger {s['trigger']:.2f}, encoder {s['encoder']:.2f}, rest {s['rest']:.2f}"
                       for name, s in split.items())
    text = (f"Linear / kNN ASR; rows: whose trigger, columns: whose {args.victim} encoder reads it (bold: each "
            f"pipeline's own reading).\n\n{table(names, matrix, args.victim)}\n\nShare of the spread of log-odds "
            f"ASR carried by the trigger, the encoder and the rest: {shares}.\n")
    if result["pixel_correlation"] is not None:
        corr = np.array(result["pixel_correlation"])
        off = np.abs(corr[~np.eye(len(corr), dtype=bool)])
        text += (f"\nThe patterns as images: pixel correlation between two pipelines' patterns {off.min():.2f} to "
                 f"{off.max():.2f} in absolute value (median {np.median(off):.2f}).\n")
    args.out.with_suffix(".md").write_text(
        results_header("Whose is the pull: every trigger on every encoder", command, env) + text)
    print(text)
    return result


if __name__ == "__main__":
    run_script(main)
