"""`cba compare`: runs grouped by the settings that differ, mean ± std over seeds, from `dvc exp show --json`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cba.compare import group_runs, runs_from_exp_show


def run(rev: str, seed: int, rate: float, asr: float, name: str | None = None) -> dict:
    return {"rev": rev, "name": name, "data": {
        "params": {"params.yaml": {"data": {"seed": seed, "poison_rate": rate, "pretrain": {"epochs": 20}}}},
        "metrics": {"metrics/summary.json": {"data": {"asr": asr, "acc": 0.7}}}}, "experiments": None}


def exp_show() -> list:
    """The shape DVC 3 prints: the workspace, then a commit whose experiments each hold a list of revisions."""
    head = run("c0ffee0", 0, 0.05, 0.50, "main")
    head["experiments"] = [{"revs": [run("a1", 1, 0.05, 0.60, "exp-a")], "name": "exp-a"},
                           {"revs": [run("a2", 2, 0.05, 0.70, "exp-b")], "name": "exp-b"},
                           {"revs": [run("b1", 0, 0.01, 0.10, "exp-c")], "name": "exp-c"},
                           {"revs": [{"rev": "q1", "name": "queued", "data": {"params": {}, "metrics": {}}}], "name": "q"}]
    return [run("workspace", 2, 0.05, 0.70), head]


def test_runs_are_grouped_by_what_differs_and_averaged_over_seeds():
    rows = runs_from_exp_show(exp_show())
    assert sorted(row["name"] for row in rows) == ["exp-a", "exp-b", "exp-c", "main"]  # no workspace, no queued run
    by, groups = group_runs(rows, ["asr", "acc"])
    assert by == ["poison_rate"]  # seed is what a group averages over; epochs never varies
    low, high = groups
    assert (low["poison_rate"], low["n"], low["seeds"]) == (0.01, 1, [0])
    assert low["asr"][0] == pytest.approx(0.10) and low["asr"][1] != low["asr"][1]  # one run: no spread
    assert (high["poison_rate"], high["n"], high["seeds"]) == (0.05, 3, [0, 1, 2])
    assert high["asr"] == pytest.approx((0.60, 0.10))  # sample std of 0.5, 0.6, 0.7


def test_compare_command_writes_table_and_plot(tmp_path):
    from stages.cli import build_app

    saved = tmp_path / "exp.json"
    saved.write_text(json.dumps(exp_show()))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(build_app(), ["compare", "--exp-json", str(saved), "--metrics", "asr",
                                              "--by", "poison_rate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| 0.05 | 3 | 0,1,2 | 0.600 ± 0.100 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("args, fragment", [
    (["--metrics", "asrr"], "--metrics='asrr'"),
    (["--by", "seed"], "--by='seed'"),
    (["--exp-json", "missing.json"], "--exp-json='missing.json'"),
])
def test_compare_bad_input_is_one_line(tmp_path, monkeypatch, args, fragment):
    from stages.cli import build_app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.json").write_text(json.dumps(exp_show()))
    base = [] if "--exp-json" in args else ["--exp-json", "exp.json"]
    result = CliRunner().invoke(build_app(), ["compare", *base, *args])
    assert result.exit_code == 2 and fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
