"""Every defense against a finished pipeline's attack, with another pattern stamped at test time.

The attacker need not stamp at test time the pattern it poisoned with: `bench/activation_pattern.py` fits
one that its poisoned surrogate reads as the target and its clean copy does not. Only what reads triggered
test images changes; the poisons, both encoders and the probe stay the pipeline's. This bench copies a finished
pipeline's code, params.yaml, data/ and metrics/ to a scratch folder (the root is only read), puts a pattern
from an activation_pattern result into the copy's data/trigger (the trigger's configuration kept), and runs
the pipeline's own stages there, with the root's own code: `cba finetune` (both victims' readings) and
`cba defend NAME` for every defense of params.yaml (or `--defenses`). It writes each pattern's readings and
defense figures beside the pipeline's own (the root's metrics).

The patterns must have been fitted for this pipeline: the result's `own` pattern must equal the root's
trigger to the bit. Asking for `own` reruns the stages on the pipeline's own pattern, which must give the
root's figures back.

    OMP_NUM_THREADS=2 python bench/activation_pattern.py --root . --weights 20 --out act.json
    OMP_NUM_THREADS=2 python bench/test_pattern_defenses.py --root . --patterns act.json --pattern "weight 20"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cba.env import command_line, environment, results_header
from cba.errors import BenchParser, run_script
from cba.io import write_json
from cba.readings import READERS, pipeline_files, pipeline_params, unfinished, victim_cells
from cba.report import defense_table
from cba.triggers import load_trigger
from cba.triggers.io import save_trigger

COPIED = ("cba", "stages", "params.yaml", "data", "metrics")  # what the stages read; the copy's stages write beside it
STAGE_INPUTS = pipeline_files() + ("cba", "stages", "metrics/finetune.json", "data/pretrain/model.safetensors",
                                   "data/pretrain/losses.parquet", "data/finetune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("."), help="a repository where `dvc repro` has run")
    parser.add_argument("--patterns", type=Path, required=True,
                        help="a bench/activation_pattern.py result (JSON) fitted on --root's pipeline")
    parser.add_argument("--pattern", action="append", required=True,
                        help="a pattern of that result to stamp at test time, e.g. 'weight 20' (repeat for several)")
    parser.add_argument("--defenses", nargs="+", default=None, help="default: params.yaml's defenses")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder for the copy (must not exist; kept). Default: a temporary one, removed")
    parser.add_argument("--out", type=Path, default=Path("bench/results/test_pattern_defenses.json"))
    args = parser.parse_args(argv)
    refusal = unfinished([args.root], STAGE_INPUTS)
    if refusal:
        parser.error(refusal)
    params = pipeline_params(args.root)
    args.defenses = args.defenses or list(params.get("defenses") or [])
    if not args.defenses:
        parser.error(f"--root {args.root}: params.yaml names no defenses; give --defenses")
    missing = [d for d in args.defenses if not (args.root / defense_record(d)).is_file()]
    if missing:
        parser.error(f"--root {args.root}: no {defense_record(missing[0])}; run `dvc repro` there first")
    if args.work is not None and args.work.exists():
        parser.error(f"--work {args.work}: exists; give a folder that does not (nothing in it is overwritten)")
    args.fitted = fitted_patterns(parser, args)
    return args


def defense_record(name: str) -> str:
    """Where `cba defend NAME` writes its whole record (metrics/defense/NAME.json holds its scalars)."""
    return f"metrics/details/defense/{name}.json"


def fitted_patterns(parser: BenchParser, args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The asked-for patterns, after checking that the result was fitted on this root's trigger."""
    try:
        result = json.loads(args.patterns.read_text())
        patterns = {name: np.asarray(p, dtype=np.float32) for name, p in result["patterns"].items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        parser.error(f"--patterns {args.patterns}: not a bench/activation_pattern.py result ({type(error).__name__})")
    trigger = load_trigger(args.root / "data/trigger")
    own = trigger.tensors().get("pattern")
    if own is None or "own" not in patterns or not np.array_equal(patterns["own"], own.numpy()):
        parser.error(f"--patterns {args.patterns}: its own pattern is not --root {args.root}'s trigger; "
                     "fit the patterns on this pipeline")
    missing = [name for name in args.pattern if name not in patterns]
    if missing:
        parser.error(f"--pattern {missing[0]!r}: not in {args.patterns}; it holds {', '.join(map(repr, patterns))}")
    linf = float(trigger.params["linf"])
    for name in args.pattern:
        if np.abs(patterns[name]).max() > linf:
            parser.error(f"--pattern {name!r}: exceeds the trigger's L-inf budget {linf:g}")
    return {name: patterns[name] for name in args.pattern}


def copy_pipeline(root: Path, work: Path) -> None:
    work.mkdir(parents=True)
    for name in COPIED:
        source = root / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, work / name)


def stamp(work: Path, pattern: np.ndarray, name: str) -> None:
    """The copy's trigger with `pattern` as its data; its configuration (name, params, seed) unchanged."""
    trigger = load_trigger(work / "data/trigger")
    trigger.set_tensors({"pattern": torch.from_numpy(pattern)}, source=f"test-time pattern {name!r}")
    save_trigger(trigger, work / "data/trigger")


def run_stage(work: Path, *argv: str) -> None:
    """One stage of the copy, with the copy's own code (its folder first on the path)."""
    path = os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", "from stages.cli import main; main()", *argv], cwd=work, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
        raise SystemExit(f"`cba {' '.join(argv)}` failed in {work}: {said[-1]}")


def figures(folder: Path, defenses: list[str]) -> dict[str, Any]:
    """A pipeline's readings and defense results, as its metrics/ holds them."""
    finetune = json.loads((folder / "metrics/finetune.json").read_text())
    readings = {victim: {reader: float(source[reader]["asr"]) for reader in READERS}
                for victim, source in (("poisoned", finetune), ("reference", finetune["reference"]))}
    results = {d: json.loads((folder / defense_record(d)).read_text()) for d in defenses}
    for result in results.values():
        for dropped in ("seconds", "env", "roc"):  # the run's own, and the curves behind the AUROC
            result.pop(dropped, None)
    return {"acc": {reader: float(finetune[reader]["acc"]) for reader in READERS}, "readings": readings,
            "defenses": results}


def run_pattern(work: Path, name: str, pattern: np.ndarray, defenses: list[str]) -> dict[str, Any]:
    stamp(work, pattern, name)
    run_stage(work, "finetune")
    for defense in defenses:
        print(f"{name}: defend {defense}", file=sys.stderr, flush=True)
        run_stage(work, "defend", defense, "--no-progress")
    return figures(work, defenses)


def markdown(result: dict[str, Any]) -> str:
    lines = ["| test-time pattern | linear / kNN ACC | poisoned linear / kNN ASR | reference linear / kNN ASR | "
             "ratio linear / kNN |", "|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        acc = run["acc"]
        lines.append(f"| {name} | {acc['linear']:.3f} / {acc['knn']:.3f} | "
                     f"{victim_cells(run['readings']['poisoned'], run['readings']['reference'], 1)} |")
    sections = ["\n".join(lines)]
    for name, run in result["runs"].items():
        sections.append(f"**Defenses, test-time pattern: {name}**\n\n{defense_table(list(run['defenses'].values()))}")
    return "\n\n".join(sections)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    params = pipeline_params(args.root)
    runs = {"pipeline's own (root's metrics)": figures(args.root, args.defenses)}
    scratch = args.work or Path(tempfile.mkdtemp(prefix="test_pattern_defenses_")) / "copy"
    try:
        copy_pipeline(args.root, scratch)
        for name, pattern in args.fitted.items():
            runs[name] = run_pattern(scratch, name, pattern, args.defenses)
    finally:
        if args.work is None:
            shutil.rmtree(scratch.parent, ignore_errors=True)
    result = {"root": str(args.root), "seed": int(params.get("seed", 0)),
              "poison_rate": float(params.get("poison_rate", 0)), "patterns": str(args.patterns),
              "defenses": args.defenses, "runs": runs}
    command, env = command_line(argv), environment(torch.device("cpu"))
    write_json(args.out, {**result, "_run": {"command": command, "env": env}})
    text = (f"**seed {result['seed']}, poison rate {result['poison_rate']:g}** ({args.root}; patterns from "
            f"{args.patterns})\n\n" + markdown(result))
    args.out.with_suffix(".md").write_text(
        results_header("Every defense with a test-time pattern fitted after the poisons", command, env) + text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    run_script(main)
