"""bench/pull_push.py: every target_sweep result read as (poisoned ASR, the pattern's pull on a clean victim)."""

from __future__ import annotations

import json
import math

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
        assert summary["meet_both"] == sum(p["poisoned_asr"] >= bar and r >= 3 for p, r in zip(chosen, ratios))
        logit = lambda p: math.log(p / (1 - p))  # noqa: E731  (no ASR here is at the floor)
        slope, shift = np.polyfit([logit(p["clean_asr"]) for p in chosen], [logit(p["poisoned_asr"]) for p in chosen], 1)
        assert summary["logit_slope"] == pytest.approx(slope) and summary["logit_shift"] == pytest.approx(shift)
    linear = next(s for s in result["summary"] if s["reader"] == "linear")
    # The AVX2 dose at 9.8% reads 0.710 against 0.313: 2.3x, the best ratio among these rows at the bar.
    assert linear["best_ratio_at_bar"] == pytest.approx(0.7103 / 0.3129, rel=1e-3) and linear["meet_both"] == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| built-in | linear (0.5) |" in (tmp_path / "p.md").read_text()


def test_files_that_are_no_sweep_are_refused_in_one_line(tmp_path):
    bench = load("pull_push")
    with pytest.raises(SystemExit) as caught:
        bench.main([str(RESULTS / "throughput.json"), "--out", str(tmp_path / "p.json")])
    assert "no target_sweep result among them" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(SystemExit, match="no such file"):
        bench.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()
