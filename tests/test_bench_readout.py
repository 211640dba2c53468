"""The readers' ceiling bench (bench/readout_ceiling.py) on hand-made features, and its refusal without a pipeline run.

Its reading of a real pipeline run is checked in test_benches_on_pipeline.py."""

from __future__ import annotations

import pytest
import torch

from benches import load, refused


def test_readout_ceiling_rates_on_hand_made_features():
    bench = load("readout_ceiling")
    # Class = the index of the largest coordinate; target 1.
    read = {"argmax": lambda f: f.argmax(1)}
    groups = {
        "recall": torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]),   # half read as the target
        "ceiling": torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]),  # three quarters
        "natural": torch.tensor([[1.0, 0.0], [1.0, 0.0]]),                          # none
        "asr": torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]),      # a quarter
    }
    row = bench.reading_rates(read, groups, target=1)["argmax"]
    assert row == pytest.approx({"recall": 0.5, "ceiling": 0.75, "natural": 0.0, "asr": 0.25, "asr_over_ceiling": 1 / 3})
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    assert bench.centroid_predict(bank, labels, torch.tensor([[0.2, 1.0], [1.0, 0.3]]), 2).tolist() == [1, 0]
    # The two nearest of a query on the target's side are both target images; on the other side, neither.
    assert bench.neighbour_share(bank, labels, torch.tensor([[0.0, 1.0], [1.0, 0.0]]), target=1, k=2) == 0.5


def test_readout_ceiling_poison_neighbours_on_hand_made_features():
    bench = load("readout_ceiling")
    # The victim's training set: two poisons at (0, 1), two clean images at (1, 0) and (0.9, 0.1), the
    # second a target image. A triggered query at (0.1, 1) has both poisons as its two nearest; a clean
    # query at (1, 0.05) has none.
    train = torch.tensor([[0.0, 1.0], [0.05, 1.0], [1.0, 0.0], [0.9, 0.1]])
    poisoned = torch.tensor([True, True, False, False])
    is_target = torch.tensor([True, True, False, True])
    # The clean bank: class 1 (the target) near (1, 0), class 0 near (0, 1).
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.2], [0.0, 1.0], [0.1, 1.0]])
    bank_labels = torch.tensor([1, 1, 0, 0])
    out = bench.poison_neighbours(train, poisoned, bank, bank_labels, torch.tensor([[1.0, 0.05]]),
                                  torch.tensor([[0.1, 1.0]]), is_target, target=1, k=2)
    assert out == pytest.approx({"poison_rate": 0.5, "clean": 0.0, "triggered": 1.0,
                                 # the poisons sit among class 0 in the clean bank; the clean target image among class 1
                                 "target_near_poisons": 0.0, "target_near_clean_target": 1.0})
    assert bench.poison_neighbours(train, torch.zeros(4, dtype=torch.bool), bank, bank_labels, bank, bank, is_target, 1, 2) == {}


def test_readout_ceiling_needs_a_pipeline_run(tmp_path, capsys):
    assert refused(load("readout_ceiling").main, ["--root", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--root {tmp_path}: no params.yaml; run `dvc repro` there first" in err
    assert not (tmp_path / "r.json").exists()


def test_readout_ceiling_knn_by_k_on_hand_made_features(tmp_path, capsys):
    bench = load("readout_ceiling")
    # Three class-0 images near (1, 0) and one class-1 image at (0, 1): one neighbour reads a query at (0.1, 1)
    # as class 1, but four neighbours outvote it (temperature 10: nearly equal weights).
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 0, 1])
    query = torch.tensor([[0.1, 1.0]])
    rows = bench.knn_by_k(bank, labels, query, torch.tensor([1]), query, target=1, num_classes=2, ks=[1, 4], temperature=10.0)
    assert rows == [{"k": 1, "acc": 1.0, "asr": 1.0}, {"k": 4, "acc": 0.0, "asr": 0.0}]
    assert refused(bench.parse_args, ["--root", str(tmp_path), "--ks", "0"]) == 2
    assert "--ks 0: every k must be at least 1" in capsys.readouterr().err
