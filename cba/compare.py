"""Many runs, one comparison: experiments grouped by their settings, each figure as mean ± std over seeds.

Input is what `dvc exp show --json` prints: the workspace, commits and their
experiments, each with its params and metrics. Runs that differ only in
`seed` form one group; every other param that varies across the runs names
the group.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

SUMMARY = "metrics/summary.json"
SEED_KEYS = ("seed",)


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _entries(node: Any) -> Iterator[dict[str, Any]]:
    """Every run record in exp-show JSON, at any depth (commits hold experiments, which hold revisions)."""
    if isinstance(node, list):
        for item in node:
            yield from _entries(item)
    elif isinstance(node, dict):
        if isinstance(node.get("data"), dict) and "params" in node["data"]:
            yield node
        for key in ("experiments", "revs"):
            yield from _entries(node.get(key))


def runs_from_exp_show(exp_show: Any, include_workspace: bool = False) -> list[dict[str, Any]]:
    """One row per run that has a summary: name, rev, flat params, summary figures. Duplicate revisions count once."""
    rows, seen = [], set()
    for entry in _entries(exp_show):
        data, rev = entry["data"], entry.get("rev")
        if rev == "workspace" and not include_workspace:
            continue
        if rev in seen:
            continue
        seen.add(rev)
        metrics = ((data.get("metrics") or {}).get(SUMMARY) or {}).get("data")
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
        if not metrics or params is None:
            continue  # a failed or queued experiment, or a commit from before the summary existed
        rows.append({"name": entry.get("name") or str(rev)[:7], "rev": rev, "params": flatten(params), "metrics": metrics})
    return rows


def varying_params(rows: list[dict[str, Any]]) -> list[str]:
    """Params whose value differs between runs (lists compared as text), seed excluded."""
    keys = sorted({key for row in rows for key in row["params"]})
    return [key for key in keys if key not in SEED_KEYS and len({repr(row["params"].get(key)) for row in rows}) > 1]


def group_runs(rows: list[dict[str, Any]], metrics: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """(the varying params, one group per distinct setting with n, seeds and mean/std of each metric)."""
    by = varying_params(rows)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(repr(row["params"].get(key)) for key in by), []).append(row)
    out = []
    for members in groups.values():
        group: dict[str, Any] = {key: members[0]["params"].get(key) for key in by}
        group["n"] = len(members)
        group["seeds"] = sorted({m["params"].get("seed") for m in members}, key=str)
        for metric in metrics:
            values = [m["metrics"][metric] for m in members if isinstance(m["metrics"].get(metric), (int, float))]
            group[metric] = (float(np.mean(values)) if values else math.nan,
                             float(np.std(values, ddof=1)) if len(values) > 1 else math.nan)
        out.append(group)
    out.sort(key=lambda g: tuple(_sort_key(g[key]) for key in by))
    return by, out


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _cell(mean_std: tuple[float, float]) -> str:
    mean, std = mean_std
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def markdown(by: list[str], groups: list[dict[str, Any]], metrics: list[str]) -> str:
    columns = [*by, "n", "seeds", *metrics]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for group in groups:
        cells = [str(group[key]) for key in by] + [str(group["n"]), ",".join(map(str, group["seeds"]))]
        cells += [_cell(group[metric]) for metric in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(groups: list[dict[str, Any]], x: str, metrics: list[str], path: Path) -> None:
    """Each metric's mean ± std against the param `x` (other varying params must be fixed for this to read well)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cba.io import write_png

    points = sorted((g for g in groups if isinstance(g.get(x), (int, float))), key=lambda g: g[x])
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric in metrics:
        means = [g[metric][0] for g in points]
        stds = [0.0 if math.isnan(g[metric][1]) else g[metric][1] for g in points]
        ax.errorbar([g[x] for g in points], means, yerr=stds, marker="o", capsize=3, label=metric)
    ax.set(xlabel=x, ylabel="rate", ylim=(0, 1), title=f"mean ± std over seeds against {x}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_png(path, fig, dpi=110)
    plt.close(fig)
