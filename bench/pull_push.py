"""Every measured attack at once: the poisoned victim's ASR against the same pattern's pull on a clean victim.

The 3x rule asks that poisoning at least triple what a pattern does on an
encoder that never saw a poison (its *pull*). This bench reads every result
of `bench/target_sweep.py` it is given (each row: one fitted pattern, one
victim poisoned with it and one clean victim of the same code, seed and
processor reading it) and puts them side by side, one point per row and per
reader (the converged linear probe, the weighted kNN):

- a scatter of poisoned ASR against the clean victim's ASR (log-log; the
  lines y = x and y = 3x, and the ASR bar of each reader), coloured by the
  processor's kernels and shaped by the data set;
- per data set and reader, how many rows meet the ASR bar, how many the 3x
  rule, how many both, and the largest ratio among rows that meet the bar;
- a least-squares line on the log-odds scale, logit(poisoned) = slope x
  logit(clean) + shift, over the built-in data's rows. A slope near 1 with a
  positive shift says poisoning multiplies the odds of every pattern's pull
  by about the same factor (e^shift), whatever the pattern: then the ratio
  is bounded for every pattern the attacker can fit, and no change that only
  lowers the pull can meet the 3x rule at the ASR bar.

It trains nothing (seconds). Rows whose victims did not end with a finite
loss are left out, as are files of other benches.

    python bench/pull_push.py                                  # every sweep under bench/results
    python bench/pull_push.py bench/results/budget_avx512*.json --out /tmp/pull_push.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from cba.data.synthetic import CLASSES as BUILT_IN_CLASSES
from cba.env import command_line
from cba.errors import run_script
from cba.io import write_json, write_png

REPO = Path(__file__).resolve().parents[1]
BARS = {"linear": 0.5, "knn": 0.3}  # the ASR each reader must reach
RATIO = 3.0
FLOOR = 1e-3  # ASRs are shown and fitted no lower than this (a share of about 1800 images)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("results", type=Path, nargs="*", default=None,
                        help="target_sweep result files (JSON); default: every one under bench/results")
    parser.add_argument("--out", type=Path, default=Path("bench/results/pull_push.json"),
                        help="the JSON; the table goes beside it as .md, the figure as .png")
    return parser.parse_args(argv)


def sweep_points(path: Path) -> list[dict[str, Any]] | None:
    """One point per row and reader of a target_sweep result; None if `path` is not one."""
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    rows = result.get("rows") if isinstance(result, dict) else None
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and {"poisoned", "clean", "target"} <= set(r) for r in rows):
        return None
    run = result.get("_run", {})
    kernels = run.get("env", {}).get("cpu_capability") or "not recorded"
    seed = run.get("victim", {}).get("seed")
    points = []
    for row in rows:
        losses = row.get("final_loss", {})
        if losses and not all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses.values()):
            continue  # a victim that blew up has no meaningful ASR
        for reader in BARS:
            poisoned, clean = row["poisoned"][reader], row["clean"][reader]
            points.append({
                "file": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path), "reader": reader,
                "data": "built-in" if row["target"] in BUILT_IN_CLASSES else "real",
                "kernels": kernels, "seed": seed, "target": row["target"], "change": row.get("change", {}),
                # early sweeps kept one rate for the run
                "poison_rate": row.get("poison_rate", run.get("poison_rate", (run.get("poison_rates") or [None])[0])), "poisoned_asr": poisoned["asr"], "clean_asr": clean["asr"],
                "acc_drop": clean["acc"] - poisoned["acc"]})
    return points


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, FLOOR, 1 - FLOOR)
    return np.log(p / (1 - p))


def summarise(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per data set and reader: rows, how many meet the bar / the 3x rule / both, the best ratio at the bar, the fit."""
    out = []
    for data in sorted({p["data"] for p in points}):
        for reader, bar in BARS.items():
            chosen = [p for p in points if p["data"] == data and p["reader"] == reader]
            if not chosen:
                continue
            poisoned = np.array([p["poisoned_asr"] for p in chosen])
            clean = np.array([p["clean_asr"] for p in chosen])
            ratio = poisoned / np.maximum(clean, FLOOR)
            at_bar = poisoned >= bar
            slope, shift = np.polyfit(_logit(clean), _logit(poisoned), 1) if len(chosen) > 2 else (math.nan, math.nan)
            out.append({"data": data, "reader": reader, "rows": len(chosen), "meet_bar": int(at_bar.sum()),
                        "meet_ratio": int((ratio >= RATIO).sum()), "meet_both": int((at_bar & (ratio >= RATIO)).sum()),
                        "best_ratio_at_bar": float(ratio[at_bar].max()) if at_bar.any() else None,
                        "logit_slope": float(slope), "logit_shift": float(shift)})
    return out


def table(summary: list[dict[str, Any]]) -> str:
    lines = ["| data | reader | rows | ASR bar met | 3x met | both | best ratio at the bar | log-odds line: slope, shift (odds x) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        best = f"{s['best_ratio_at_bar']:.1f}x" if s["best_ratio_at_bar"] is not None else "–"
        fit = (f"{s['logit_slope']:.2f}, {s['logit_shift']:+.2f} ({math.exp(s['logit_shift']):.1f}x)"
               if math.isfinite(s["logit_slope"]) else "–")
        lines.append(f"| {s['data']} | {s['reader']} ({BARS[s['reader']]:g}) | {s['rows']} | {s['meet_bar']} | "
                     f"{s['meet_ratio']} | {s['meet_both']} | {best} | {fit} |")
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"AVX2": "tab:blue", "AVX512": "tab:orange", "not recorded": "tab:gray"}
    markers = {"built-in": "o", "real": "x"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    line = np.array([FLOOR, 1.0])
    for ax, (reader, bar) in zip(axes, BARS.items()):
        for kernels, colour in colours.items():
            for data, marker in markers.items():
                chosen = [p for p in points if p["reader"] == reader and p["kernels"] == kernels and p["data"] == data]
                if chosen:
                    ax.scatter([max(p["clean_asr"], FLOOR) for p in chosen], [max(p["poisoned_asr"], FLOOR) for p in chosen],
                               c=colour, marker=marker, s=22, alpha=0.8, label=f"{data}, {kernels}")
        ax.plot(line, line, color="black", lw=0.8, label="no effect of poisoning (y = x)")
        ax.plot(line / RATIO, line, color="red", lw=1.0, ls="--", label=f"the {RATIO:g}x rule (y = {RATIO:g}x)")
        ax.axhline(bar, color="green", lw=1.0, ls=":", label=f"ASR bar {bar:g}")
        xs = np.logspace(math.log10(FLOOR), math.log10(1 / RATIO), 200)
        ax.fill_between(xs, np.maximum(RATIO * xs, bar), 1.0, color="green", alpha=0.1)
        ax.set(xscale="log", yscale="log", xlim=(FLOOR, 1), ylim=(FLOOR, 1), title=f"{reader}",
               xlabel="clean victim's ASR (the pattern's own pull)", ylabel="poisoned victim's ASR")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Every measured pattern: poisoning against the pattern's own pull (shaded: both bars met)")
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    files = args.results or sorted((REPO / "bench/results").rglob("*.json"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"results {missing[0]!r}: no such file; give target_sweep result files (JSON)")
    points: list[dict[str, Any]] = []
    used = []
    for path in files:
        found = sweep_points(path.resolve())
        if found is not None and path.resolve() != args.out.resolve():
            points += found
            used.append(str(path))
    if not points:
        raise SystemExit(f"results {', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}: "
                         "no target_sweep result among them")
    summary = summarise(points)
    result = {"summary": summary, "points": points, "_run": {"command": command_line(argv), "files": used}}
    write_json(args.out, result)
    text = table(summary)
    args.out.with_suffix(".md").write_text(
        f"# Poisoning against the pattern's own pull, over every measured attack\n\nCommand: `{result['_run']['command']}`\n\n"
        f"{len(used)} result files, {len(points) // 2} rows (a pattern, its poisoned victim and a clean one).\n\n{text}\n\n"
        f"![poisoned against clean ASR]({args.out.with_suffix('.png').name})\n")
    plot(points, args.out.with_suffix(".png"))
    print(text)
    return result


if __name__ == "__main__":
    run_script(main)
