"""The hit-overlap bench (bench/hit_overlap.py) on hand-made margins, and its refusal without a pipeline run.

Its reading of a real pipeline run is checked in test_benches_on_pipeline.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benches import load, refused
from cba.evaluate import knn_predict, knn_votes


def test_margin_is_positive_exactly_where_the_target_wins():
    bench = load("hit_overlap")
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    assert bench.margin(scores, target=1) == pytest.approx([0.5, -0.2, -0.4])
    assert ((bench.margin(scores, 1) > 0) == (scores.argmax(1) == 1).numpy()).all()


def test_a_constant_push_and_an_amplified_pull_are_told_apart():
    bench = load("hit_overlap")
    rng = np.random.default_rng(0)
    clean = rng.normal(-3, 1, 500)
    pull = rng.normal(2, 1, 500)  # what the pattern does to each image on the reference victim
    reference = {"clean": clean, "triggered": clean + pull}
    pushed = bench.compare({"clean": clean, "triggered": clean + pull + 1.5}, reference)
    assert pushed["slope"] == pytest.approx(1.0) and pushed["push"] == pytest.approx(1.5)
    assert pushed["pull"] == pytest.approx(pull.mean()) and pushed["shift_correlation"] == pytest.approx(1.0)
    assert pushed["residual_std"] == pytest.approx(0.0, abs=1e-9)
    noisy = bench.compare({"clean": clean, "triggered": clean + pull + 1.5 + rng.normal(0, 0.5, 500)}, reference)
    assert noisy["push"] == pytest.approx(1.5, abs=0.15) and noisy["residual_std"] == pytest.approx(0.5, abs=0.05)
    amplified = bench.compare({"clean": clean, "triggered": clean + 2 * pull}, reference)
    assert amplified["slope"] == pytest.approx(2.0) and amplified["push"] == pytest.approx(0.0, abs=1e-9)
    # Every reference hit is kept by both (each shift only grows), and the hit counts add up.
    for row in (pushed, amplified):
        assert row["kept"] == 1.0 and row["reference_only"] == 0
        assert row["both"] + row["poisoned_only"] == round(row["asr_poisoned"] * row["n"])
        assert row["both"] == round(row["asr_reference"] * row["n"])
    # A constant push flips the misses nearest the target first: the lowest band of the reference's margin gains
    # least.
    bands = pushed["added_by_band"]
    assert len(bands) == bench.BANDS and bands[0] < bands[-1]


def test_each_class_gets_its_own_push():
    bench = load("hit_overlap")
    labels = np.array([0, 0, 1, 1, 2, 2])
    clean = np.array([-5.0, -4.0, -5.0, -4.0, -5.0, -4.0])
    pull = np.array([1.0, 2.0, 1.0, 2.0, 1.0, 2.0])
    reference = {"clean": clean, "triggered": clean + pull}
    poisoned = {"clean": clean, "triggered": clean + pull + np.array([1.0, 1.0, 3.0, 3.0, 4.5, 4.5])}
    rows = bench.by_class(poisoned, reference, labels, ["a", "b", "c"], slope=1.0)
    assert {name: row["push"] for name, row in rows.items()} == pytest.approx({"a": 1.0, "b": 3.0, "c": 4.5})
    assert rows["a"]["poisoned"] == 0.0 and rows["b"]["poisoned"] == 0.5 and rows["c"]["poisoned"] == 1.0
    assert all(row["reference"] == 0.0 for row in rows.values())


def test_knn_votes_are_what_knn_predict_argmaxes():
    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 8, generator=gen), torch.randn(20, 8, generator=gen)
    labels = torch.randint(0, 3, (50,), generator=gen)
    votes = knn_votes(bank, labels, queries, 3, k=10, temperature=0.1)
    assert votes.shape == (20, 3) and (votes >= 0).all()
    # each row sums the k weights exp(similarity / T), whichever classes they go to
    sims = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    assert torch.allclose(votes.sum(1), (sims.topk(10, dim=1).values / 0.1).exp().sum(1), rtol=1e-5)
    assert torch.equal(votes.argmax(1), knn_predict(bank, labels, queries, 3, k=10, temperature=0.1))
    assert knn_votes(bank, labels, queries[:0], 3).shape == (0, 3)


def test_the_bench_refuses_a_folder_without_a_pipeline_run_and_a_refit_without_rates(tmp_path, capsys):
    bench = load("hit_overlap")
    assert refused(bench.main, ["--root", str(tmp_path)]) == 2
    assert "run `dvc repro` there first" in capsys.readouterr().err
    for path in bench.NEEDED:  # stand-ins: the check looks only for the files
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    for change in (["--trigger-params", "{w_neutral: 5}"], ["--rates", "0.05", "--trigger-params", "[1, 2]"]):
        assert refused(bench.main, ["--root", str(tmp_path), *change]) == 2
        assert "--trigger-params" in capsys.readouterr().err
