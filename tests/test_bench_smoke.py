"""The bench scripts run end to end on tiny settings and write the tables they promise.

Their figures at real sizes are in the README; here only that each script works
and that every row and cell it reports is filled from a real run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_compare_writes_one_row_per_method(tmp_path):
    out = tmp_path / "trl.md"
    load("trl_compare").main(["--train-size", "200", "--test-size", "60", "--epochs", "2", "--width", "4",
                              "--methods", "simclr,supervised", "--eval-every", "1", "--probe-epochs", "2",
                              "--quiet", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["simclr", "supervised"]
    assert [r["mode"] for r in rows] == ["clean_label", "dirty_label"]
    for row in rows:
        assert 0 <= row["knn_acc"] <= 1 and 0 <= row["knn_asr"] <= 1 and 0 <= row["max_loss_auroc"] <= 1
        assert [c["epoch"] for c in row["curves"]] == [1, 2] and "knn_acc" in row["curves"][0]
    assert rows[1]["head_acc"] is not None and "head_acc" not in rows[0]
    text = out.read_text()
    assert "| simclr | clean_label |" in text and "| supervised | dirty_label |" in text


def test_trl_compare_rejects_an_unknown_method():
    with pytest.raises(SystemExit):
        load("trl_compare").parse_args(["--methods", "simclr,dino"])


def test_defense_matrix_fills_every_cell(tmp_path):
    out = tmp_path / "dm.md"
    load("defense_matrix").main(["--train-size", "200", "--test-size", "60", "--epochs", "1", "--width", "4", "--fast",
                                 "--attacks", "badnets", "--defenses", "spectral,strip", "--nc-steps", "2",
                                 "--nc-images", "10", "--quiet", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["matrix"]) == {"spectral", "strip"}
    for cells in result["matrix"].values():
        assert "error" not in cells["badnets"] and 0 <= cells["badnets"]["auroc"] <= 1
    assert result["nc_timing"]["batched"] > 0 and result["nc_timing"]["per_class"] > 0
    assert "BadNets (supervised)" in out.read_text()
