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
  rule, how many every rule (the bar, 3x, and ACC at most 3 points under
  the clean victim's), and the largest ratio among rows that meet the bar;
- the *odds multiplier* of each row, odds(poisoned ASR) / odds(clean ASR)
  (odds = p / (1 - p)): by how much poisoning multiplies the odds of the
  pattern's pull. Both rules of a reader hold together only if it reaches
  odds(bar) / odds(bar / 3), at the pull of bar / 3: 5 for the probe (a pull
  of 1/6 raised to 1/2), 3.9 for kNN (0.1 raised to 0.3); a smaller pull
  needs a larger multiplier still. The summary gives its median and
  quartiles, and how many rows reach the multiplier the rules need.

It trains nothing (seconds). Rows whose victims did not end with a finite
loss are left out, as are files of other benches; a run kept in two files
(the same figures, processor and seed) counts once.

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
from cba.errors import BenchParser, run_script
from cba.io import write_json, write_png
from cba.verdicts import ODDS_FLOOR as FLOOR, odds  # ASRs are shown and fitted no lower than FLOOR

REPO = Path(__file__).resolve().parents[1]
BARS = {"linear": 0.5, "knn": 0.3}  # the ASR each reader must reach
RATIO = 3.0
ACC_DROP = 0.03  # the poisoned victim's ACC may be at most this far under the clean victim's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    run_rate = run.get("poison_rate", (run.get("poison_rates") or [None])[0])  # early sweeps kept one rate a run
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
                "poison_rate": row.get("poison_rate", run_rate), "poisoned_asr": poisoned["asr"], "clean_asr": clean["asr"],
                "acc_drop": clean["acc"] - poisoned["acc"]})
    return points


def needed_multiplier(bar: float) -> float:
    """The least odds multiplier that meets the ASR bar and the 3x rule together (at a pull of bar / RATIO)."""
    return odds(bar) / odds(bar / RATIO)


def summarise(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per data set and reader: rows, how many meet the bar / the 3x rule / every rule, the best ratio at the bar,
    and the odds multipliers (median, quartiles, how many reach the one the two rules need)."""
    out = []
    for data in sorted({p["data"] for p in points}):
        for reader, bar in BARS.items():
            chosen = [p for p in points if p["data"] == data and p["reader"] == reader]
            if not chosen:
                continue
            poisoned = np.array([p["poisoned_asr"] for p in chosen])
            ratio = poisoned / np.array([max(p["clean_asr"], FLOOR) for p in chosen])
            multiplier = np.array([odds(p["poisoned_asr"]) / odds(p["clean_asr"]) for p in chosen])
            at_bar = poisoned >= bar
            acc_kept = np.array([p["acc_drop"] <= ACC_DROP for p in chosen])
            quartiles = np.percentile(multiplier, [25, 50, 75])
            out.append({"data": data, "reader": reader, "rows": len(chosen), "meet_bar": int(at_bar.sum()),
                        "meet_ratio": int((ratio >= RATIO).sum()), "meet_all": int((at_bar & (ratio >= RATIO) & acc_kept).sum()),
                        "best_ratio_at_bar": float(ratio[at_bar].max()) if at_bar.any() else None,
                        "odds_multiplier_quartiles": [float(q) for q in quartiles],
                        "odds_multiplier_needed": needed_multiplier(bar),
                        "reach_needed_multiplier": int((multiplier >= needed_multiplier(bar)).sum())})
    return out


def table(summary: list[dict[str, Any]]) -> str:
    lines = ["| data | reader (ASR bar) | rows | bar met | 3x met | every rule | best ratio at the bar | "
             "odds multiplier: median (quartiles) | needed | rows reaching it |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        best = f"{s['best_ratio_at_bar']:.1f}x" if s["best_ratio_at_bar"] is not None else "–"
        low, median, high = s["odds_multiplier_quartiles"]
        lines.append(f"| {s['data']} | {s['reader']} ({BARS[s['reader']]:g}) | {s['rows']} | {s['meet_bar']} | "
                     f"{s['meet_ratio']} | {s['meet_all']} | {best} | {median:.2f} ({low:.2f}–{high:.2f}) | "
                     f"{s['odds_multiplier_needed']:.2f} | {s['reach_needed_multiplier']} |")
    return "\n".join(lines)


def _multiplied(pull: np.ndarray, multiplier: float) -> np.ndarray:
    """The ASR whose odds are `multiplier` times those of `pull`."""
    raised = multiplier * pull / (1 - pull)
    return raised / (1 + raised)


def plot(points: list[dict[str, Any]], summary: list[dict[str, Any]], path: Path) -> None:
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
        curve = np.logspace(math.log10(FLOOR), -1e-3, 200)
        built_in = next((s for s in summary if s["reader"] == reader and s["data"] == "built-in"), None)
        if built_in is not None:
            median = built_in["odds_multiplier_quartiles"][1]
            ax.plot(curve, _multiplied(curve, median), color="tab:orange", lw=1.0, ls="-.",
                    label=f"odds x {median:.1f} (built-in median)")
        needed = needed_multiplier(bar)
        ax.plot(curve, _multiplied(curve, needed), color="green", lw=1.0, ls="-.", label=f"odds x {needed:.1f} (what both rules need)")
        xs = np.logspace(math.log10(FLOOR), math.log10(1 / RATIO), 200)
        ax.fill_between(xs, np.maximum(RATIO * xs, bar), 1.0, color="green", alpha=0.1)
        ax.set(xscale="log", yscale="log", xlim=(FLOOR, 1), ylim=(FLOOR, 1), title=f"{reader}",
               xlabel="clean victim's ASR (the pattern's own pull)", ylabel="poisoned victim's ASR")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Every measured pattern: poisoning against the pattern's own pull (shaded: the ASR bar and 3x met)")
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
    used, seen = [], set()
    for path in files:
        found = sweep_points(path.resolve())
        if found is None or path.resolve() == args.out.resolve():
            continue
        used.append(str(path))
        for point in found:
            # The same run kept in two files (a sweep's default row beside its variants) counts once.
            key = tuple(point[k] for k in ("reader", "kernels", "seed", "target", "poison_rate", "poisoned_asr", "clean_asr"))
            if key not in seen:
                seen.add(key)
                points.append(point)
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
    plot(points, summary, args.out.with_suffix(".png"))
    print(text)
    return result


if __name__ == "__main__":
    run_script(main)
