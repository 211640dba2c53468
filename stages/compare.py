"""`cba compare`: the experiments of this repository in one table (and plot), mean ± std over seeds.

Not a DVC stage: it reads what `dvc exp show --json` reports (run it after
`dvc exp run --queue -S seed=0,1,2 -S poison_rate=...` and `dvc queue start`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import typer

from cba.compare import group_runs, markdown, plot, runs_from_exp_show
from cba.errors import ConfigError
from cba.io import atomic_path
from stages.common import check_outputs, one_line_errors

DEFAULT_METRICS = "ACC,ASR,kNN_ACC,kNN_ASR,natural,RA"


def exp_show_json(all_commits: bool) -> object:
    cmd = ["dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ConfigError("dvc", "not found", "DVC on the PATH (pip install dvc), or pass --exp-json FILE") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ConfigError("dvc exp show", last, "a DVC repository with experiments (run `dvc exp run` first)")
    return json.loads(done.stdout)


@one_line_errors
def compare(
    by: str = typer.Option(None, "--by", help="Param for the plot's x axis, e.g. poison_rate (default: no plot)."),
    metrics: str = typer.Option(None, "--metrics", help=f"Comma-separated keys of metrics/summary.json [default: those of {DEFAULT_METRICS} the runs have]."),
    all_commits: bool = typer.Option(False, "--all-commits", help="Include every commit's experiments, not only HEAD's."),
    workspace: bool = typer.Option(False, "--workspace", help="Count the workspace as a run of its own."),
    exp_json: Path = typer.Option(None, "--exp-json", help="Read this saved `dvc exp show --json` output instead of running DVC."),
    out: Path = typer.Option(Path("experiments/compare"), "--out",
                             help="Writes OUT.md (and OUT.png with --by); outside reports/, which `cba report` owns."),
) -> None:
    """Group experiments by the params that differ between them (seed aside); print mean ± std of each metric."""
    names = [name.strip() for name in (metrics or DEFAULT_METRICS).split(",") if name.strip()]
    if not names:
        raise ConfigError("--metrics", metrics, "comma-separated metric names, e.g. ASR,kNN_ASR")
    check_outputs(out.parent)
    if exp_json is not None and not exp_json.is_file():
        raise ConfigError("--exp-json", str(exp_json), "an existing file written by `dvc exp show --json`")
    try:
        data = json.loads(exp_json.read_text()) if exp_json is not None else exp_show_json(all_commits)
    except json.JSONDecodeError as exc:
        raise ConfigError("--exp-json", str(exp_json), f"valid JSON ({exc.msg} at line {exc.lineno})") from None
    rows = runs_from_exp_show(data, include_workspace=workspace)
    if not rows:
        raise ConfigError("experiments", 0, "at least one run with metrics/summary.json (run `dvc repro` or `dvc exp run`)")
    known = {key for row in rows for key in row["metrics"]}
    if metrics is None:
        names = [name for name in names if name in known] or sorted(known)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError("--metrics", ",".join(unknown), f"keys of metrics/summary.json: {', '.join(sorted(known))}")
    varying, groups = group_runs(rows, names)
    if by is not None and by not in varying:
        raise ConfigError("--by", by, f"a param that varies across the runs: {', '.join(varying) or 'none does'}")
    table = markdown(varying, groups, names)
    text = (f"# Experiments compared\n\n{len(rows)} runs in {len(groups)} groups; mean ± std (sample) over the runs "
            f"of each group, which differ only in seed.\n\n{table}\n")
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    if by is not None:
        plot(groups, by, names, out.with_suffix(".png"))
    print(table)
    print(f"compare: {len(rows)} runs, {len(groups)} groups -> {out.with_suffix('.md')}"
          + (f", {out.with_suffix('.png')}" if by is not None else ""))
