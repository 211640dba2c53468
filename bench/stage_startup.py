"""How long a pipeline stage takes to start: importing each stage's module in a fresh process, against torch alone.

Every `dvc repro` starts one process per stage (sixteen with the nine default defenses), and each pays
its imports before it does any work. Per stage module, and for `import torch` as the baseline run in the
same way, this times `python -c "import <module>"` as a whole process (wall and user+sys CPU, from the
operating system's accounting of the finished child), `--runs` times after one warm-up, alternating the
modules so that a drift in the machine's speed touches them alike. It prints the median of each and the
median ratio to torch's: a ratio near 1 means the stage loads little beyond torch.

Which packages a module loads is checked too: `heavy` lists those of sklearn, scipy, matplotlib and kornia
that the import pulled in (the stages load them only where a defense, the analysis, an augmentation or the
stealth figures use them).

    python bench/stage_startup.py                         # every stage, 5 runs: about 4 minutes on two cores
    python bench/stage_startup.py --modules stages.defend stages.pretrain --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cba.env import command_line, environment, where_it_ran
from cba.errors import BenchParser, run_script
from cba.io import write_json

STAGES = ("stages.validate", "stages.trigger", "stages.poison", "stages.pretrain", "stages.finetune", "stages.analyze",
          "stages.defend", "stages.report")
BASELINE = "torch"
HEAVY = ("sklearn", "scipy", "matplotlib", "kornia")
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--modules", nargs="+", default=list(STAGES), help="modules to import, one process each")
    parser.add_argument("--runs", type=int, default=5, help="counted runs of each module, after one warm-up")
    parser.add_argument("--baseline", default=BASELINE, help="the module every ratio is taken against")
    parser.add_argument("--out", type=Path, default=Path("bench/results/stage_startup.json"))
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: must be at least 1")
    return args


def timed_import(module: str) -> dict[str, float]:
    """Wall and CPU seconds of a fresh `python -c "import <module>"`, from the OS's accounting of the child."""
    before = os.times()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = os.times()
    if done.returncode != 0:
        raise SystemExit(f"import {module} failed: {done.stderr.strip().splitlines()[-1]}")
    return {"wall": wall, "cpu": (after.children_user - before.children_user) + (after.children_system - before.children_system)}


def heavy_packages(module: str) -> list[str]:
    """Which of HEAVY the import of `module` loads."""
    probe = f"import sys, {module}; print(' '.join(p for p in {HEAVY!r} if p in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return done.stdout.split()


def measure(modules: list[str], runs: int, baseline: str = BASELINE) -> dict[str, dict[str, Any]]:
    order = [baseline, *modules]
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in order}
    for index in range(runs + 1):  # the first round warms the file cache and is not counted
        for module in order:
            sample = timed_import(module)
            if index:
                samples[module].append(sample)
    base = samples[baseline]
    rows = {}
    for module in order:
        runs_of = samples[module]
        rows[module] = {
            "wall_median": statistics.median(s["wall"] for s in runs_of),
            "cpu_median": statistics.median(s["cpu"] for s in runs_of),
            # Pair by pair with the baseline run just before it, then the median: robust to drift.
            "wall_ratio": statistics.median(s["wall"] / b["wall"] for s, b in zip(runs_of, base)),
            "heavy": heavy_packages(module),
            "runs": len(runs_of),
        }
    return rows


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| module | wall s (median) | CPU s (median) | wall / the first row's | loads |", "|---|---|---|---|---|"]
    for module, r in rows.items():
        lines.append(f"| {module} | {r['wall_median']:.2f} | {r['cpu_median']:.2f} | {r['wall_ratio']:.2f} "
                     f"| {', '.join(r['heavy']) or '–'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = command_line(argv)
    rows = measure(args.modules, args.runs, args.baseline)
    result = {"command": command, "env": environment("cpu"), "rows": rows}
    write_json(args.out, result)
    text = (f"# Stage start-up: importing each stage module in a fresh process\n\nCommand: `{command}`\n\n"
            f"Run on {where_it_ran(result['env'])}.\n\n{table(rows)}\n")
    args.out.with_suffix(".md").write_text(text)
    print(table(rows))
    return result


if __name__ == "__main__":
    run_script(main)
