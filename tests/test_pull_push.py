"""bench/pull_push.py: every target_sweep result read as (poisoned ASR, the pattern's pull on a clean victim)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benches import BENCH, load

RESULTS = BENCH / "results"
SWEEPS = [RESULTS / "budget_avx512.json", RESULTS / "divert_avx512.json", RESULTS / "poison_dose.json"]


def test_each_row_and_reader_becomes_one_point_with_the_files_own_figures(tmp_path):
    out = tmp_path / "pull_push.json"
    result = load("pull_push").main([*map(str, SWEEPS), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    rows = [row for path in SWEEPS for row in json.loads(path.read_text())["rows"]]
    points = result["points"]
    assert len(points) == 2 * len(rows)
    for reader in ("linear", "knn"):
        got = [(p["poisoned_asr"], p["clean_asr"]) for p in points if p["reader"] == reader]
        assert got == [(row["poisoned"][reader]["asr"], row["clean"][reader]["asr"]) for row in rows]
    # The seed and the kernels come from each file's record of its run.
    assert {p["kernels"] for p in points} == {"AVX2", "AVX512"} and {p["seed"] for p in points} == {0}
    assert {p["poison_rate"] for p in points if p["file"].endswith("poison_dose.json")} == {0.01, 0.025, 0.05, 0.075, 0.098}


def test_the_counts_and_the_log_odds_line_are_those_of_the_points(tmp_path):
    result = load("pull_push").main([*map(str, SWEEPS), "--out", str(tmp_path / "p.json")])
    for summary in result["summary"]:
        bar = {"linear": 0.5, "knn": 0.3}[summary["reader"]]
        chosen = [p for p in result["points"] if p["reader"] == summary["reader"] and p["data"] == summary["data"]]
        ratios = [p["poisoned_asr"] / max(p["clean_asr"], 1e-3) for p in chosen]
        assert summary["rows"] == len(chosen)
        assert summary["meet_bar"] == sum(p["poisoned_asr"] >= bar for p in chosen)
        assert summary["meet_all"] == sum(p["poisoned_asr"] >= bar and r >= 3 and p["acc_drop"] <= 0.03
                                          for p, r in zip(chosen, ratios))
        odds = lambda p: p / (1 - p)  # noqa: E731  (no ASR here is at the floor or the ceiling)
        multipliers = [odds(p["poisoned_asr"]) / odds(p["clean_asr"]) for p in chosen]
        assert summary["odds_multiplier_quartiles"] == pytest.approx(list(np.percentile(multipliers, [25, 50, 75])))
        needed = odds(bar) / odds(bar / 3)  # the pull of bar / 3 raised to the bar: both rules, just
        assert summary["odds_multiplier_needed"] == pytest.approx(needed)
        assert summary["reach_needed_multiplier"] == sum(m >= needed for m in multipliers)
        # Reaching the multiplier is necessary for meeting both ASR rules.
        assert summary["meet_all"] <= summary["reach_needed_multiplier"]
    linear = next(s for s in result["summary"] if s["reader"] == "linear")
    # The AVX2 dose at 9.8% reads 0.710 against 0.313: 2.3x, the best ratio among these rows at the bar.
    assert linear["best_ratio_at_bar"] == pytest.approx(0.7103 / 0.3129, rel=1e-3) and linear["meet_all"] == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| built-in | linear (0.5) |" in (tmp_path / "p.md").read_text()


def test_a_row_that_costs_more_than_3_points_of_acc_meets_no_rule_set(tmp_path):
    # One real row, its poisoned probe's ACC then lowered by 2 and by 4 points: only the first still meets every rule.
    row = next(r for r in json.loads((RESULTS / "poison_dose_avx512_seed1.json").read_text())["rows"])
    assert row["poisoned"]["linear"]["asr"] >= 0.5 and row["poisoned"]["linear"]["asr"] >= 3 * row["clean"]["linear"]["asr"]
    summaries = []
    for drop in (0.02, 0.04):
        changed = json.loads(json.dumps(row))
        changed["poisoned"]["linear"]["acc"] = changed["clean"]["linear"]["acc"] - drop
        path = tmp_path / f"drop{drop}.json"
        path.write_text(json.dumps({"rows": [changed]}))
        result = load("pull_push").main([str(path), "--out", str(tmp_path / f"p{drop}.json")])
        summaries.append(next(s for s in result["summary"] if s["reader"] == "linear"))
    assert [(s["meet_bar"], s["meet_ratio"], s["meet_all"]) for s in summaries] == [(1, 1, 1), (1, 1, 0)]


def test_a_run_kept_in_two_files_counts_once(tmp_path):
    once = load("pull_push").main([str(SWEEPS[0]), "--out", str(tmp_path / "once.json")])
    twice = load("pull_push").main([str(SWEEPS[0]), str(SWEEPS[0]), "--out", str(tmp_path / "twice.json")])
    assert twice["points"] == once["points"] and twice["summary"] == once["summary"]


def test_files_that_are_no_sweep_are_refused_in_one_line(tmp_path):
    bench = load("pull_push")
    with pytest.raises(SystemExit) as caught:
        bench.main([str(RESULTS / "throughput.json"), "--out", str(tmp_path / "p.json")])
    assert "no target_sweep result among them" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(SystemExit, match="no such file"):
        bench.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()
